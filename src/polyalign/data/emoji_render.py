"""Emoji pictures as RGB images of one size: PNGs decoded and resized, iconify SVG icons rasterised with cairosvg;
transparency is composited onto white. An unreadable picture raises ValueError with the skip reason."""
from __future__ import annotations

import io

from PIL import Image

from polyalign.errors import DataError

IMAGE_SIZE = 64
CORRUPT, CORRUPT_SVG, BLANK = "corrupt PNG", "unrenderable SVG", "blank image"
_SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="{left} {top} {width} {height}">{body}</svg>'


def flatten(rgba: Image.Image, size: int) -> Image.Image:
    """An RGBA image resized to size × size and composited onto white, as RGB (ValueError if fully transparent)."""
    if rgba.getextrema()[3][1] == 0:
        raise ValueError(BLANK)
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def composite_png(data: bytes, size: int = IMAGE_SIZE) -> Image.Image:
    """Decode a PNG fully and flatten it onto white: an RGB image of size × size (ValueError if unreadable)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgba = im.convert("RGBA")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(CORRUPT) from e
    return flatten(rgba, size)


def iconify_svg(icon_set: dict, name: str) -> str | None:
    """The standalone SVG of icon ``name`` in an iconify icon set (``icons.json``), following ``aliases`` (with
    their hFlip, vFlip and rotate); None when the set has no such icon, the alias chain is broken or a size or
    turn is not a number."""
    try:
        return _iconify_svg(icon_set, name)
    except (TypeError, ValueError, AttributeError):
        return None


def _iconify_svg(icon_set: dict, name: str) -> str | None:
    icons, aliases, props, seen = icon_set.get("icons") or {}, icon_set.get("aliases") or {}, {}, set()
    while name not in icons:  # walk the alias chain: the nearest alias's values win, flips and turns add up
        alias = aliases.get(name)
        if not isinstance(alias, dict) or name in seen or "parent" not in alias:
            return None
        seen.add(name)
        for key, value in alias.items():
            if key in ("hFlip", "vFlip"):
                props[key] = props.get(key, False) != bool(value)
            elif key == "rotate":
                props[key] = props.get(key, 0) + int(value)
            elif key != "parent":
                props.setdefault(key, value)
        name = alias["parent"]
    icon = icons[name]
    if not isinstance(icon, dict) or not isinstance(icon.get("body"), str):
        return None
    box = {k: float(props.get(k, icon.get(k, icon_set.get(k, d)))) for k, d in
           (("left", 0), ("top", 0), ("width", 16), ("height", 16))}
    hflip = props.get("hFlip", False) != bool(icon.get("hFlip", False))
    vflip = props.get("vFlip", False) != bool(icon.get("vFlip", False))
    turns, body, transforms = props.get("rotate", 0) + int(icon.get("rotate", 0)), icon["body"], []
    if hflip and vflip:
        turns += 2
    elif hflip or vflip:  # the same transforms as iconify's iconToSVG
        transforms.append(f"translate({box['width'] + box['left']:g} {-box['top']:g}) scale(-1 1)" if hflip else
                          f"translate({-box['left']:g} {box['height'] + box['top']:g}) scale(1 -1)")
        box["left"] = box["top"] = 0.0
    turns %= 4
    if turns == 1:
        c = box["height"] / 2 + box["top"]
        transforms.insert(0, f"rotate(90 {c:g} {c:g})")
    elif turns == 2:
        transforms.insert(0, f"rotate(180 {box['width'] / 2 + box['left']:g} {box['height'] / 2 + box['top']:g})")
    elif turns == 3:
        c = box["width"] / 2 + box["left"]
        transforms.insert(0, f"rotate(-90 {c:g} {c:g})")
    if turns % 2:
        box = {"left": box["top"], "top": box["left"], "width": box["height"], "height": box["width"]}
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    return _SVG.format(**{k: f"{v:g}" for k, v in box.items()}, body=body)


def render_svg(svg: str | bytes, size: int = IMAGE_SIZE) -> Image.Image:
    """Rasterise an SVG at size × size (aspect kept, centred) and flatten it onto white: ValueError(CORRUPT_SVG,
    detail) when cairosvg cannot draw it, ValueError(BLANK) when it draws nothing. External files and URLs are
    never read (cairosvg's ``unsafe`` stays off)."""
    try:
        import cairosvg
    except (ImportError, OSError) as e:  # OSError: the cairo library itself is missing
        raise DataError(f"SVG emoji styles need cairosvg and the cairo library ({e}); "
                        f"`pip install cairosvg` and install libcairo2") from e
    data = svg.encode() if isinstance(svg, str) else svg
    try:
        png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size, unsafe=False)
        with Image.open(io.BytesIO(png)) as im:
            rgba = im.convert("RGBA")
    except Exception as e:  # noqa: BLE001 - any failure inside the SVG renderer is this entry's skip, not a crash
        raise ValueError(CORRUPT_SVG, f"{type(e).__name__}: {e}"[:200]) from e
    return flatten(rgba, size)
