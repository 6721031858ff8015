"""One small interface over sentencepiece models and Hugging Face tokenizer folders.

Everything downstream (shards, stream, export) needs only: encode a batch of texts, the EOS id
that separates packed documents, the vocabulary size (which fixes the shard dtype and the
embedding size), and a content hash that ties shards to the exact tokenizer that made them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import RecipeError, StrataError
from pipeline.files import write_bytes_atomic

if TYPE_CHECKING:
    from pipeline.recipe.spec import Recipe


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
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:  # "could not parse ModelProto" for any other file
            raise StrataError(f"{self.path}: not a sentencepiece model ({e})") from None
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


def check_tokenizers(recipe: Recipe) -> None:
    """Load every tokenizer the recipe names; each stage tokenizer must extend the one before it.

    Raises RecipeError naming the key (`tokenizer`, `stages[i].tokenizer`) of every problem.
    """
    problems: list[str] = []
    loaded: dict[str, Tokenizer | None] = {}
    for key, path in [("tokenizer", recipe.tokenizer)] + [(f"stages[{i}].tokenizer", s.tokenizer)
                                                          for i, s in enumerate(recipe.stages) if s.tokenizer]:
        if path not in loaded:
            try:
                loaded[path] = cached_tokenizer(path)
            except StrataError as e:
                loaded[path] = None
                problems.append(f"{key}: {e}")
    before = recipe.tokenizer
    for i, stage in enumerate(recipe.stages):
        if stage.tokenizer is None or stage.tokenizer == before:
            continue
        old, new = loaded.get(before), loaded.get(stage.tokenizer)
        problem = extension_problem(old, new) if old is not None and new is not None else None
        if problem is not None:
            problems.append(f"stages[{i}].tokenizer: {problem}")
        before = stage.tokenizer
    if problems:
        raise RecipeError(recipe.file, problems)


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


# ---------------------------------------------------------------------------------------------
# Extending a sentencepiece model with pieces for a new language.


@dataclass
class Extension:
    base_size: int
    added: int
    out: Path


def extend_sentencepiece(base_model: Path, texts: Iterable[str], add: int, out: Path) -> Extension:
    """Append up to `add` pieces learned on `texts` to a sentencepiece model; old ids are unchanged.

    A model of the same kind (BPE or unigram, same normaliser, byte fallback, digit splitting) is
    trained on the new text; its pieces that the base lacks are appended in its own order (for BPE
    that is merge order, so every appended piece can be built from pieces before it). BPE merges by
    score, highest first: appended pieces score below every old piece, so old merges keep their
    priority. Unigram pieces keep the new model's log-probabilities.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    base = pb.ModelProto()
    base.ParseFromString(Path(base_model).read_bytes())
    spec = base.trainer_spec
    if spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        raise StrataError(f"{base_model}: only BPE and unigram sentencepiece models can be extended")
    known = {p.piece for p in base.pieces}
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise StrataError("tokenizer extend: the input has no text")
    options = dict(
        model_type="bpe" if spec.model_type == pb.TrainerSpec.BPE else "unigram",
        byte_fallback=spec.byte_fallback, split_digits=spec.split_digits,
        character_coverage=spec.character_coverage or 0.9995,
        allow_whitespace_only_pieces=spec.allow_whitespace_only_pieces,
        remove_extra_whitespaces=base.normalizer_spec.remove_extra_whitespaces,
        normalization_rule_name=base.normalizer_spec.name or "identity",
        split_by_whitespace=spec.split_by_whitespace, treat_whitespace_as_suffix=spec.treat_whitespace_as_suffix,
        max_sentence_length=max(spec.max_sentence_length, 16384), input_sentence_size=2_000_000,
        shuffle_input_sentence=True, hard_vocab_limit=False, num_threads=2, minloglevel=2,
        pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0,
    )
    specials = 1 + (256 if spec.byte_fallback else 0)
    size, new = add + specials + 64, []
    for _ in range(4):  # the new model overlaps the base; grow it until `add` pieces are new
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=size, **options)
        learned = pb.ModelProto()
        learned.ParseFromString(buf.getvalue())
        new = [p for p in learned.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL and p.piece not in known]
        if len(new) >= add or len(learned.pieces) < size:  # enough, or the text has no more to give
            break
        size += 2 * (add - len(new))
    new = new[:add]
    low = min((p.score for p in base.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL), default=0.0)
    bpe = spec.model_type == pb.TrainerSpec.BPE
    for k, piece in enumerate(new):
        entry = base.pieces.add()
        entry.piece = piece.piece
        entry.score = low - 1 - k if bpe else piece.score
        entry.type = pb.ModelProto.SentencePiece.NORMAL
    base.trainer_spec.vocab_size = len(base.pieces)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, base.SerializeToString())
    return Extension(base_size=len(known), added=len(new), out=out)
