"""``polyalign serve``: the search service (FastAPI) and its web page.

    GET  /                       the page: a search box, a grid of results, "more like this", drop an image
    GET  /search?text=…&k=10&target=image|text     GET /search?like=ID&k=…     POST /search (form: file, k, target)
    GET  /items/{id}             an item's metadata          GET /items/{id}/image   its thumbnail (PNG)
    GET  /healthz                what is served

Bad input is a 4xx JSON ``{"error": "...", "status": N}`` that says what is wrong; nothing answers with a traceback.
"""
from __future__ import annotations

import io
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from polyalign.errors import DataError, PolyalignError
from polyalign.serve.search import MAX_K, Searcher

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
THUMB_SIZE = 160


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _k(value: str | int | None) -> int:
    try:
        k = int(value if value not in (None, "") else 10)
    except (TypeError, ValueError):
        raise ApiError(400, f"k must be a whole number between 1 and {MAX_K}, got {value!r}") from None
    if not 1 <= k <= MAX_K:
        raise ApiError(400, f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _hits(searcher: Searcher, hits, query: dict, target: str, k: int, t0: float) -> dict:
    results = []
    for h in hits:
        item = quote(h.id, safe="")
        meta = searcher.item(h.id) if h.id in searcher.by_id else {}
        has_picture = searcher.item_part == "image" and bool(meta.get("thumb") or meta.get("path"))
        results.append({"rank": h.rank, "id": h.id, "score": round(h.score, 6), "caption": h.caption,
                        "image_url": f"/items/{item}/image" if has_picture else None, "item_url": f"/items/{item}"})
    return {"query": query, "target": target or searcher.item_part, "k": k,
            "took_ms": round((time.perf_counter() - t0) * 1000, 2), "results": results}


def create_app(index_dir, run_dir=None, device: str = "cpu", backend: str = "faiss", searcher: Searcher | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The FastAPI app serving one index (``searcher`` or ``Searcher(index_dir, run_dir, device, backend)``)."""
    searcher = searcher or Searcher(index_dir, run_dir, device, backend)
    searcher.encoder  # load the run now: the first query must not wait for it
    app = FastAPI(title="polyalign search", version="1", docs_url="/docs")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error(e.status, e.message)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return error(e.status_code, str(e.detail) if e.status_code != 404 else "no such page")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "body"))
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug: say so briefly, never with a traceback
        return error(500, f"internal error ({type(e).__name__}); see the server's log")

    def run(t0: float, query: dict, k: int, target: str, **kw) -> dict:
        try:
            target = searcher.check(k, target)
            return _hits(searcher, searcher.search(k=k, target=target, **kw), query, target, k, t0)
        except KeyError as e:
            raise ApiError(404, f"no item with id {e.args[0]!r} in the index") from None
        except (DataError, PolyalignError) as e:
            raise ApiError(400, str(e)) from None

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    def healthz():
        parts = searcher.info["parts"]
        return {"status": "ok", "items": parts[searcher.item_part]["items"],
                "texts": parts.get("text", {}).get("items", 0), "dim": parts[searcher.item_part]["dim"],
                "run": _display_path(searcher.info["run"]), "kind": searcher.info["kind"], "parts": list(parts)}

    @app.get("/search")
    def search_get(text: str | None = None, like: str | None = None, k: str = "10", target: str = ""):
        t0, k = time.perf_counter(), _k(k)
        if (text is None) == (like is None):
            raise ApiError(400, "give exactly one of text=… or like=ID (or POST an image)")
        if text is not None and not text.strip():
            raise ApiError(400, "the text query is empty: type some words")
        if text is not None and len(text) > 1000:
            raise ApiError(400, f"the text query is {len(text)} characters long; at most 1000")
        query = {"text": text} if text is not None else {"like": like}
        return run(t0, query, k, target, text=text, like=like)

    @app.post("/search")
    def search_post(request: Request, file: UploadFile = File(...), k: str = Form("10"), target: str = Form("")):
        t0, k = time.perf_counter(), _k(k)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:
            raise ApiError(413, f"the upload is {int(length):,} bytes; at most {max_upload_bytes:,}")
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"the image is over {max_upload_bytes:,} bytes")
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        return run(t0, {"image": file.filename or "upload"}, k, target, image=_open_image(data, file.filename))

    @app.get("/items/{item_id:path}/image")
    def item_image(item_id: str):
        if item_id not in searcher.by_id:
            raise ApiError(404, f"no item with id {item_id!r} in the index")
        png = _thumbnail(str(searcher.root), searcher.item(item_id).get("thumb"), searcher.item(item_id).get("path"))
        if png is None:
            raise ApiError(404, f"item {item_id!r} has no picture")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/items/{item_id:path}")
    def item(item_id: str):
        if item_id not in searcher.by_id:
            raise ApiError(404, f"no item with id {item_id!r} in the index")
        m = searcher.item(item_id)
        pic = searcher.item_part == "image" and (m.get("thumb") or m.get("path"))
        return {"id": m["id"], "caption": m["caption"], "captions": m["captions"], "fields": m.get("fields", {}),
                "image_url": f"/items/{quote(m['id'], safe='')}/image" if pic else None}

    app.state.searcher = searcher
    return app


def _display_path(path: str) -> str:
    """A run's path as the page shows it: relative to the working directory when inside it, else its last three
    parts (the machine's folders are not the user's business)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*p.parts[-3:])) if len(p.parts) > 3 else str(p)


def _open_image(data: bytes, name: str | None):
    """The uploaded bytes as a decoded PIL image, or a 415 that names the file."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Image.DecompressionBombError:
        raise ApiError(413, f"{name or 'the upload'} has too many pixels") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        raise ApiError(415, f"{name or 'the upload'} is not an image PIL can read (PNG, JPEG, WebP, GIF, BMP, ...)") \
            from None


@lru_cache(maxsize=4096)
def _thumbnail(root: str, thumb: str | None, path: str | None) -> bytes | None:
    """A PNG of at most THUMB_SIZE px per side of the item's picture (its thumbnail file or its image file)."""
    from PIL import Image, ImageOps

    source = Path(root) / thumb if thumb else Path(path) if path else None
    if source is None or not source.is_file():
        return None
    try:
        with Image.open(source) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "PA", "P") else im.convert("RGB")
            if max(im.size) < THUMB_SIZE:  # small pictures (emoji, shapes) are scaled up, crisp
                scale = THUMB_SIZE // max(im.size)
                im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except OSError:
        return None


def serve(index_dir, host: str = "127.0.0.1", port: int = 8000, run_dir=None, device: str = "cpu",
          backend: str = "faiss", threads: int = 0) -> None:
    """Run the service until interrupted (``threads`` > 0: torch's and FAISS's thread counts)."""
    import uvicorn

    if threads > 0:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)

    app = create_app(index_dir, run_dir, device, backend)
    s = app.state.searcher
    print(f"serving {index_dir} ({s.info['parts'][s.item_part]['items']} {s.item_part} items) on http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="info")
