"""hooks/: scoped switches restore exactly what they replaced; refused arguments; the decode loops agree with a
full forward. Tiny random models, so these run in the fast suite."""
import pytest
import torch
from conftest import TINY_LLAMA
from transformers import AttentionInterface, MistralConfig, MistralForCausalLM

from driftscope import paths
from driftscope.errors import ConfigError
from driftscope.hooks import decode
from driftscope.hooks.attention import QUANT_IMPLEMENTATIONS, attention_implementation, registered
from driftscope.hooks.layers import decoder_layers, instrumented

def test_registered_nests_and_restores_the_previous_registrations():
    before = dict(AttentionInterface._global_mapping)
    with registered("emulate"):
        outer = AttentionInterface._global_mapping[QUANT_IMPLEMENTATIONS[0]]
        with registered("emulate"):
            assert AttentionInterface._global_mapping[QUANT_IMPLEMENTATIONS[0]] is not outer
        assert AttentionInterface._global_mapping[QUANT_IMPLEMENTATIONS[0]] is outer
    assert dict(AttentionInterface._global_mapping) == before


def test_attention_implementation_is_restored_after_an_error(tiny_llama):
    original = tiny_llama.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), registered("emulate"):
        with attention_implementation(tiny_llama, "sage8"):
            assert tiny_llama.config._attn_implementation == "sage8"
            raise RuntimeError("boom")
    assert tiny_llama.config._attn_implementation == original


def test_instrumented_sees_plain_tensors_and_leaves_nothing_behind(tiny_llama):
    seen, before = [], dict(AttentionInterface._global_mapping)
    ref = paths.get_path("fp32")

    def attention(layer, q, k, v, *, causal, scale):
        seen.append((layer, tuple(q.shape), tuple(k.shape), causal))
        return ref(q, k, v, causal=causal, scale=scale).to(q.dtype)

    residuals = []

    def keep(i, h):
        residuals.append((i, tuple(h.shape)))

    with torch.inference_mode(), instrumented(tiny_llama, attention, keep):
        decode.greedy(tiny_llama, torch.arange(10)[None], 2)
    assert seen[:2] == [(0, (1, 2, 10, 64), (1, 1, 10, 64), True), (1, (1, 2, 10, 64), (1, 1, 10, 64), True)]
    assert seen[2] == (0, (1, 2, 1, 64), (1, 1, 11, 64), False)  # a decode step: q_len 1 against the cache
    assert residuals[0] == (0, (1, 10, 128))
    assert dict(AttentionInterface._global_mapping) == before
    assert all(not layer._forward_hooks for layer in decoder_layers(tiny_llama))


def test_a_model_without_decoder_layers_is_refused_in_one_line():
    from driftscope.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="Linear has no decoder; .* as `layers`") as e:
        decoder_layers(torch.nn.Linear(2, 2))
    assert isinstance(e.value, TypeError) and "\n" not in str(e.value)


def test_teacher_forced_logits_equal_a_full_forward(tiny_llama):
    with torch.inference_mode():
        prompt = torch.arange(3, 15)
        forced = torch.tensor(decode.greedy(tiny_llama, prompt[None], 6))
        tf = decode.teacher_forced(tiny_llama, prompt, forced)
        full = decode.full_logits(tiny_llama, torch.cat([prompt, forced[:-1]])).float()
    assert tf.shape == (6, TINY_LLAMA["vocab_size"])
    assert torch.allclose(tf, full[len(prompt) - 1:], atol=1e-4, rtol=0)
    assert tf.argmax(-1).tolist() == forced.tolist()  # greedy tokens are the argmax of the teacher-forced logits


def test_sliding_window_is_refused_for_every_path():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY_LLAMA, sliding_window=4)).eval()
    with registered("emulate"):
        for name in ("sage8", "sdpa"):
            attention = (lambda layer, q, k, v, *, causal, scale: q) if name == "sdpa" else None
            with torch.inference_mode(), pytest.raises(ConfigError, match=r"'mistral' passes sliding_window=4"):
                if attention is None:
                    with attention_implementation(model, name):
                        model(torch.arange(8)[None])
                else:
                    with instrumented(model, attention):
                        model(torch.arange(8)[None])


def test_nonfinite_attention_outputs_are_counted_and_warned(tiny_llama):
    from driftscope.measure.records import Context, Records
    from driftscope.run.tap import Tap, nonfinite_warnings, run_prompt

    fp32 = paths.get_path("fp32")

    class NaNPath:  # a kernel that returns NaN in one head, as 1.0.6's causal kernel did on an H100
        name = "broken"

        def __call__(self, q, k, v, *, causal, scale=None):
            out = fp32(q, k, v, causal=causal, scale=scale).clone()
            out[:, 0, -1, :3] = float("nan")
            return out

    for mode in ("propagated", "isolated"):
        records = Records(context=Context(prompt=0, length=12, mode=mode))
        tap = Tap([fp32, NaNPath()], mode, records, with_stats=False)
        run_prompt(tiny_llama, torch.arange(12), tap, decode_steps=1)
        cols = records.columns()
        counts = {(p, int(l), ph): v for p, l, ph, m, v in zip(cols["path"], cols["layer"], cols["phase"],
                                                                cols["metric"], cols["value"]) if m == "nonfinite"}
        assert counts[("broken", 0, "prefill")] == 3 and counts[("fp32", 1, "decode")] == 0
        lines = nonfinite_warnings(cols)
        assert len(lines) == 2 * TINY_LLAMA["num_hidden_layers"]  # every layer, prefill and decode
        assert f"broken returned 3 non-finite attention outputs at layer 0 (prefill, {mode}; prompt 0 (12 tokens))" \
            in "\n".join(lines)
