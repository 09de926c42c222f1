"""The bundled MiniLM encoder and the null embedding."""

import torch

from pyraflow.text import TextConfig, load_null, load_text_encoder as text_encoder, save_null


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
