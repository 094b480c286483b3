"""polyalign: multimodal contrastive representation learning.

    import polyalign
    m = polyalign.load("runs/demo")           # a trained (or connected) run, ready to encode
    m.encode_text(["a red circle"])            # (1, E), L2-normalised
"""
__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(run, which: str = "auto", device="cpu"):
    """A trained run (``polyalign train``) or a connected one (``polyalign connect``), ready to encode: see
    :func:`polyalign.serve.loader.load`."""
    from polyalign.serve.loader import load as _load

    return _load(run, which, device)
