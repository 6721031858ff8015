"""One small interface over sentencepiece models and Hugging Face tokenizer folders.

Everything downstream (shards, stream, export) needs only: encode a batch of texts, the EOS id
that separates packed documents, the vocabulary size (which fixes the shard dtype and the
embedding size), and a content hash that ties shards to the exact tokenizer that made them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from pipeline.errors import StrataError


def _hash_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.path = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise StrataError(f"{self.path}: the sentencepiece model has no EOS piece (train it with eos_id set)")
        self.pad_id = self._sp.pad_id()
        self.bos_id = self._sp.bos_id()
        self.content_hash = _hash_files([self.path])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def pieces(self) -> list[str]:
        """The piece of every id, in id order."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def save_to(self, folder: Path) -> None:
        """Write the model where a Hugging Face export expects it (LlamaTokenizer reads tokenizer.model)."""
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, folder / "tokenizer.model")
        special = {"eos_token": self._sp.id_to_piece(self.eos_id)}
        if self.bos_id >= 0:
            special["bos_token"] = self._sp.id_to_piece(self.bos_id)
        if self._sp.unk_id() >= 0:
            special["unk_token"] = self._sp.id_to_piece(self._sp.unk_id())
        if self.pad_id >= 0:
            special["pad_token"] = self._sp.id_to_piece(self.pad_id)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": False, "model_max_length": 1 << 30, **special}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        # Convert once here (needs protobuf) and save the fast tokenizer.json beside the model,
        # so that loading the export is quick and needs nothing but transformers.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(folder), local_files_only=True).save_pretrained(str(folder))


class HFTokenizer:
    kind = "huggingface"

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        self.path = Path(folder)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise StrataError(f"{self.path}: not a loadable Hugging Face tokenizer folder ({e})") from None
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise StrataError(f"{self.path}: the tokenizer has no eos_token; set one in tokenizer_config.json")
        self.eos_id = int(eos)
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else -1
        self.bos_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else -1
        files = [p for p in self.path.iterdir() if p.is_file() and p.suffix in {".json", ".model", ".txt"}
                 and p.name != "config.json"]
        self.content_hash = _hash_files(files)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def pieces(self) -> list[str]:
        """The token of every id, in id order (the vocab dict, inverted)."""
        return [str(t) for t in self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))]

    def save_to(self, folder: Path) -> None:
        self._tok.save_pretrained(str(folder))


Tokenizer = SentencePieceTokenizer | HFTokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece `.model` file or a Hugging Face tokenizer folder."""
    path = Path(path)
    if path.is_dir():
        return HFTokenizer(path)
    if path.is_file():
        return SentencePieceTokenizer(path)
    raise StrataError(f"tokenizer not found: {path}")


@lru_cache(maxsize=8)
def cached_tokenizer(path: str) -> Tokenizer:
    """`load_tokenizer`, once per path and process (the recipe's tokenizers are looked up often)."""
    return load_tokenizer(path)


def extension_problem(old: Tokenizer, new: Tokenizer) -> str | None:
    """Why `new` does not extend `old` (every old id must keep its piece, EOS must stay), or None.

    A model trained with `old` reads `new`'s ids correctly only when this holds: its embedding
    rows are indexed by id, so an id that now means another piece would silently be wrong.
    """
    if new.vocab_size < old.vocab_size:
        return f"has {new.vocab_size} pieces, fewer than the {old.vocab_size} of the tokenizer before it"
    if new.eos_id != old.eos_id:
        return f"has EOS id {new.eos_id}, the tokenizer before it {old.eos_id}"
    new_pieces = new.pieces()
    for i, piece in enumerate(old.pieces()):
        if new_pieces[i] != piece:
            return (f"changes id {i} from {piece!r} to {new_pieces[i]!r}; a stage tokenizer must keep every "
                    f"existing id (extend it with `strata tokenizer extend`)")
    return None


def train_sentencepiece(texts: Iterator[str], out: Path, vocab_size: int, *, seed_sentences: int = 2_000_000,
                        character_coverage: float = 0.9995) -> Path:
    """Train a BPE sentencepiece model with byte fallback (no unknown bytes, ever).

    Ids: 0 <pad>, 1 <s>, 2 </s> (EOS, separates packed documents), 3 <unk>.
    """
    import sentencepiece as spm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = out.with_suffix("")
    spm.SentencePieceTrainer.train(
        sentence_iterator=texts,
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=character_coverage,
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,  # code needs its indentation
        normalization_rule_name="identity",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=2,
        minloglevel=2,
    )
    vocab = prefix.with_suffix(".vocab")
    if vocab.exists():
        vocab.unlink()
    model = prefix.with_suffix(".model")
    if model != out:
        model.replace(out)
    return out
