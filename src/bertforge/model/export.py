"""Every model leaves bertforge as a transformers folder, whatever its architecture (ONNX: `model/onnx_export.py`).

Two transformers layouts, chosen by the architecture (`write_transformers_folder`):

- **BERT** (post-LN, biases, MLP feed-forward, absolute positions: `BertConfig.hf_compatible`): a plain
  Hugging Face BERT folder (`model_type: "bert"`, HF weight names through `hf_compat`), loaded by
  `AutoModel*.from_pretrained(folder)` with no extra code.
- **Everything else** (the budget presets: pre-LN, no biases, GeGLU; rotary positions when the model has
  them): `model_type: "bertforge"`, our weight names, and `modeling_bertforge.py` beside them, loaded by
  `AutoModel*.from_pretrained(folder, trust_remote_code=True)` with only torch and transformers
  installed. `auto_map` names AutoModel, AutoModelForPreTraining, AutoModelForMaskedLM,
  AutoModelForSequenceClassification, AutoModelForQuestionAnswering and AutoModelForMultipleChoice.

The modeling file cannot drift from our model: `modeling_source` generates it at export time from the
source of `model/bert.py`, `model/heads.py` (and every bertforge module they import, `errors.py`
included), followed by the thin wrappers in `model/hf_remote.py`. Their `from bertforge... import`
lines become `pass` (or `alias = name`), since everything then lives in one module; anything the
inliner cannot follow (`import bertforge.x`, two modules defining one top-level name) is an error at
export time, never a broken file on a user's disk.

Both layouts carry a `bertforge` block in config.json (version, head, run metadata; the remote-code
layout also lists our config fields, so an older bertforge refuses a folder with a switch it lacks)
that transformers keeps and ignores, so `load_model` gets back everything `save_model` was given.

**Why not ModernBERT's classes for the budget presets** (`transformers.ModernBertConfig`, no remote
code)? ModernBERT is pre-LN, bias-free and GeGLU like our budget presets, with the same fused `Wqkv`,
the same gate-first GeGLU split, an embedding LayerNorm, a final norm and a dense -> act -> norm MLM
head with a decoder bias tied to the embeddings. It differs in five places, and each is a change of
architecture (a retrain), not a renaming of weights:

1. positions: rotary only (rotate-half, `global_rope_theta`); ours are a learned absolute table unless
   `position_embedding_type="rotary"`;
2. no token-type embeddings: ours add `token_type_embeddings[type]` before the embedding norm; folding
   row 0 into the word embeddings is exact for single-segment input only, and shifts every MLM logit of
   a position by one constant (same softmax, logits not equal), since the decoder is tied;
3. layer 0 has no attention norm (`attn_norm = Identity`): ours normalises the already-normalised
   embeddings again, and LayerNorm with a learned weight is not idempotent, so no weight mapping exists;
4. sequence classification / multiple choice pool [CLS] or the mean, then dense -> act -> LayerNorm
   -> linear; ours is BERT's tanh pooler -> linear. QA puts the same dense -> act -> norm block before
   its linear; ours is one linear. There is no NSP (pretraining) head;
5. attention alternates local (sliding-window) and global layers by default (`global_attn_every_n_layers
   = 1` turns that off).

So the route would be a new preset family (rotary, no token types, no layer-0 attention norm,
ModernBERT's classifier/QA heads), not an export trick; its encoder and MLM head would then map one
to one (`embeddings.word_embeddings` -> `model.embeddings.tok_embeddings`, `embeddings.norm` ->
`model.embeddings.norm`, `layers.i.attention.qkv|out` -> `model.layers.i.attn.Wqkv|Wo`, `attn_norm`
-> `attn_norm` (i > 0), `ffn_norm` -> `mlp_norm`, `ffn.up|down` -> `mlp.Wi|Wo`, `final_norm` ->
`model.final_norm`, `cls.dense|norm` -> `head.dense|norm`, `cls.bias` -> `decoder.bias`). Compute
and size barely move (the dropped tables are 0.28% of budget-mini's encoder parameters, 0.06% of
crammed's; RoPE adds elementwise work on q and k). Gains: no `trust_remote_code`; tools that run only
architectures they implement (Text Embeddings Inference; Optimum's ONNX exporter, which needs an
export config per model type) take the models; transformers' ModernBERT kernels (unpadding,
FlashAttention) come free. Costs: NSP pretraining and the
tanh-pooler heads go, sentence-pair tasks lose their segment embedding, every budget model trained so
far must be retrained, and masked-LM quality per CPU hour with those changes is unmeasured (it needs
the recipe runs). The remote-code route here exports every model bertforge trains, exactly, today.

Shapes: B batch, T sequence length, C choices, H hidden size, V vocabulary.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bertforge._version import __version__
from bertforge.errors import BertforgeError
from bertforge.model import hf_compat
from bertforge.model.bert import BertConfig

MODELING_FILE = "modeling_bertforge.py"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REMOTE_MODEL_TYPE = "bertforge"
# our head -> the class in the generated modeling file
REMOTE_CLASSES: dict[str, str] = {
    "base": "BertforgeModel",
    "pretraining": "BertforgeForPreTraining",
    "masked_lm": "BertforgeForMaskedLM",
    "sequence_classification": "BertforgeForSequenceClassification",
    "question_answering": "BertforgeForQuestionAnswering",
    "multiple_choice": "BertforgeForMultipleChoice",
}
REMOTE_HEADS = {cls: head for head, cls in REMOTE_CLASSES.items()}
AUTO_MAP = {"AutoConfig": "BertforgeConfig", "AutoModel": "BertforgeModel",
            "AutoModelForPreTraining": "BertforgeForPreTraining", "AutoModelForMaskedLM": "BertforgeForMaskedLM",
            "AutoModelForSequenceClassification": "BertforgeForSequenceClassification",
            "AutoModelForQuestionAnswering": "BertforgeForQuestionAnswering",
            "AutoModelForMultipleChoice": "BertforgeForMultipleChoice"}
_TEMPLATE = "bertforge.model.hf_remote"
_NOT_MODEL_FIELDS = ("attn_implementation",)  # HF's runtime setting, not part of the saved architecture


# ----------------------------------------------------------------------------- the modeling file

def modeling_source() -> str:
    """The self-contained `modeling_bertforge.py`: our modules inlined, then the transformers wrappers."""
    order: list[str] = []
    _collect(_TEMPLATE, order, [])
    parts, owner = [], {}
    for name in order:
        text, defined = _inline(name)
        for top in defined:
            if top in owner and top != "__future__":
                raise RuntimeError(f"cannot generate {MODELING_FILE}: '{top}' is defined in both "
                                   f"{owner[top]} and {name}; rename one of them")
            owner[top] = name
        parts.append(f"# {'-' * 77}\n# section: {name}\n\n{text.strip()}\n")
    header = (f'"""Generated by bertforge {__version__} from its own model code; do not edit.\n\n'
              f"Load with `transformers.AutoModel*.from_pretrained(folder, trust_remote_code=True)`.\n"
              f'Sections: {", ".join(order)}.\n"""\n\nfrom __future__ import annotations\n\n')
    return header + "\n\n".join(parts)


def _module_path(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"cannot generate {MODELING_FILE}: module {name} not found")
    return Path(spec.origin)


def _bertforge_imports(tree: ast.Module) -> list[ast.stmt]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bertforge":
            for alias in node.names:  # names only: a module object or `*` cannot be inlined
                if alias.name == "*" or _is_module(f"{node.module}.{alias.name}"):
                    raise RuntimeError(f"cannot generate {MODELING_FILE}: `from {node.module} import "
                                       f"{alias.name}` at line {node.lineno}; import the names it defines")
            found.append(node)
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "bertforge" for a in node.names):
            raise RuntimeError(f"cannot generate {MODELING_FILE}: `import {node.names[0].name}` at line "
                               f"{node.lineno}; use `from bertforge.x import name`")
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def _collect(name: str, order: list[str], stack: list[str]) -> None:
    """Depth-first: the bertforge modules `name` imports come before it in `order`."""
    if name in order:
        return
    if name in stack:
        raise RuntimeError(f"cannot generate {MODELING_FILE}: import cycle {' -> '.join([*stack, name])}")
    tree = ast.parse(_module_path(name).read_text(encoding="utf-8"))
    for node in _bertforge_imports(tree):
        _collect(node.module, order, [*stack, name])
    order.append(name)


def _inline(name: str) -> tuple[str, list[str]]:
    """`name`'s source with its bertforge imports and `from __future__` removed; its top-level names."""
    source = _module_path(name).read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    drops = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    for node in sorted([*_bertforge_imports(tree), *drops], key=lambda n: n.lineno, reverse=True):
        indent = " " * node.col_offset
        aliases = [f"{indent}{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
        lines[node.lineno - 1:node.end_lineno] = aliases or [f"{indent}pass  # inlined: {node.module}"]
    defined = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            defined.append(node.name)
        elif isinstance(node, ast.Assign):
            defined += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.append(node.target.id)
    return "\n".join(lines), defined


# ----------------------------------------------------------------------------- transformers folders

def uses_remote_code(config: BertConfig) -> bool:
    """True when transformers has no class for this architecture (loading needs trust_remote_code)."""
    return not config.hf_compatible


def transformers_config(config: BertConfig, head: str, *, num_labels: int | None = None,
                        id2label: Mapping[int, str] | None = None, meta: Mapping | None = None) -> dict:
    """The config.json of a transformers folder: HF BERT's, or ours with `auto_map` (see module doc).
    `meta` (run metadata) goes into the `bertforge` block; None leaves the block out of a plain HF BERT
    export. The remote-code layout always has the block, with the names of our config fields in it,
    so that a bertforge without one of them refuses the folder instead of silently dropping a switch."""
    block = {"version": __version__, "head": head}
    if not uses_remote_code(config):
        extra = {} if meta is None else {"bertforge": {**block, "meta": dict(meta)}}
        return {**hf_compat.config_to_hf(config, head, num_labels, id2label), **extra}
    fields_ = sorted(k for k in config.to_dict() if k not in _NOT_MODEL_FIELDS)
    block = {**block, "config_fields": fields_, **({} if meta is None else {"meta": dict(meta)})}
    doc = {"architectures": [REMOTE_CLASSES[head]], "model_type": REMOTE_MODEL_TYPE,
           "auto_map": {auto: f"{Path(MODELING_FILE).stem}.{cls}" for auto, cls in AUTO_MAP.items()},
           **{k: v for k, v in config.to_dict().items() if k not in _NOT_MODEL_FIELDS},
           "tie_word_embeddings": False}
    if head == "sequence_classification":
        labels = hf_compat.config_to_hf(BertConfig(), head, num_labels, id2label)
        doc.update({k: labels[k] for k in ("id2label", "label2id", "problem_type")})
    return {**doc, "bertforge": block}


def transformers_state_dict(model: nn.Module, head: str) -> dict[str, torch.Tensor]:
    """The weights file's tensors: HF BERT names, or ours for the remote-code layout; CPU, contiguous."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if not uses_remote_code(model.config):
        state = hf_compat.to_hf_state_dict(state, model.config, head)
    return state


def write_transformers_folder(model: nn.Module, head: str, folder: Path, *, tokenizer=None,
                              num_labels: int | None = None, id2label: Mapping[int, str] | None = None,
                              meta: Mapping | None = None, weights: bool = True) -> None:
    """Write config.json, model.safetensors (unless not `weights`), the tokenizer (model_max_length =
    the model's positions) and, for non-BERT architectures, modeling_bertforge.py into `folder`."""
    doc = transformers_config(model.config, head, num_labels=num_labels, id2label=id2label, meta=meta)
    try:
        text = json.dumps(doc, indent=2)
    except TypeError as e:
        raise BertforgeError(f"model metadata for '{folder}' is not JSON-serialisable ({e}): keep meta to "
                             f"strings, numbers, lists and dicts") from None
    if weights:
        save_file(transformers_state_dict(model, head), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
    if uses_remote_code(model.config):
        (folder / MODELING_FILE).write_text(modeling_source(), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(folder)
        set_model_max_length(folder, model.config.max_position_embeddings)


def set_model_max_length(folder: Path, positions: int) -> None:
    """tokenizer_config.json's `model_max_length` := the model's position count (what transformers'
    tokenizers truncate to), whatever the tokenizer object wrote."""
    path = folder / "tokenizer_config.json"
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["model_max_length"] = positions
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_remote_config(raw: Mapping) -> tuple[BertConfig, str, dict]:
    """(config, head, bertforge block) of a remote-code config.json (ours or re-saved by transformers)."""
    names = set(BertConfig.__dataclass_fields__) - set(_NOT_MODEL_FIELDS)
    block = raw.get("bertforge") if isinstance(raw.get("bertforge"), dict) else {}
    unknown = sorted(set(block.get("config_fields", ())) - names)
    if unknown:
        raise BertforgeError(f"model config fields {unknown} are unknown to this bertforge (the folder was "
                             f"written by bertforge {block.get('version')}): upgrade bertforge to load it")
    config = BertConfig.from_dict({k: raw[k] for k in names if k in raw})
    archs = raw.get("architectures") or [REMOTE_CLASSES[block.get("head", "base")]]
    if len(archs) != 1 or archs[0] not in REMOTE_HEADS:
        raise BertforgeError(f"config architectures {archs} is not supported: use one of "
                             f"{', '.join(REMOTE_HEADS)}")
    return config, REMOTE_HEADS[archs[0]], block
