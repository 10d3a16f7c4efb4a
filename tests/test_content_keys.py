"""Content keys: a chunk's text key and a column's model key change with everything that
could change a vector, and with nothing else."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.inputs.models import weights_hash
from shared.records.content_keys import model_key, text_key


def test_a_text_key_is_the_texts_own() -> None:
    key = text_key("The boundary layer separates.")
    assert key == hashlib.sha256(b"The boundary layer separates.").hexdigest()[:32]
    assert text_key("The boundary layer separates.") == key
    assert text_key("The boundary layer separates!") != key
    assert text_key("caf\u00e9") != text_key("cafe\u0301")  # no normalisation: the model's own


def test_a_model_key_changes_with_what_decides_the_vectors() -> None:
    base = ("sentence-transformers/all-MiniLM-L6-v2", "c9745ed1", "tok1:ab", "float32")
    key = model_key(*base)
    assert key.startswith("ck1:") and len(key) == 4 + 32
    assert model_key(*base) == key
    for field in range(4):
        changed = list(base)
        changed[field] += "x"
        assert model_key(*changed) != key, f"field {field} left the key unchanged"


def test_the_files_digest_covers_weights_and_pooling_not_the_model_card(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "modules.json").write_text("[]")
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / "README.md").write_text("# a card")
    before = weights_hash(folder)
    (folder / "README.md").write_text("# another card")
    assert weights_hash(folder) == before
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    pooled = weights_hash(folder)
    assert pooled != before
    (folder / "model.safetensors").write_bytes(b"\x01" * 64)
    assert weights_hash(folder) != pooled
