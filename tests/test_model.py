import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import released_crate
from model import ISTA, MSSA, ModelConfig, Transformer, load_model, overwrite

GPT2 = dict(attn='mha', ffn='mlp', bias=False)

# The equations first: a released CRATE checkpoint, ISTA and MSSA against the paper's formulas written out by hand.


def crate_from_the_equations(sd, idx, n_layer, heads):
    """Logits and codes of a released CRATE, written from the paper's equations with plain tensor operations."""
    w = {k.removeprefix('_orig_mod.'): v.double() for k, v in sd.items()}
    ln = lambda x, p: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) \
        * w[p + '.weight'] + w[p + '.bias']
    B, T = idx.shape
    z = w['transformer.wte.weight'][idx] + w['transformer.wpe.weight'][:T]
    codes = []
    for i in range(n_layer):
        p = f'transformer.h.{i}.'
        u = ln(z, p + 'prenorm_1') @ w[p + 'attn.c_attn.weight'].T                     # u = U x, query = key = value
        uk = u.view(B, T, heads, -1).transpose(1, 2)
        scores = uk @ uk.transpose(-1, -2) / math.sqrt(uk.shape[-1])
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float('-inf'))
        heads_out = (scores.softmax(-1) @ uk).transpose(1, 2).reshape(B, T, -1)
        z = z + heads_out @ w[p + 'attn.c_proj.weight'].T + w[p + 'attn.c_proj.bias']   # Z_half = Z + MSSA(LN1(Z))
        x, D = ln(z, p + 'prenorm_2'), w[p + 'ista.weight'].T                          # D: d x 4d
        A = torch.zeros(B, T, D.shape[1], dtype=torch.float64)
        for _ in range(2):                           # A_k = ReLU(A_{k-1} + eta D^T (x - D A_{k-1}) - eta lambda)
            A = torch.relu(A + 0.1 * (x - A @ D.T) @ D - 0.1 * 0.1)
        codes.append(A)
        z = A @ D.T                                                                    # Z_next = D A_t
    return ln(z, 'transformer.ln_f') @ w['transformer.wte.weight'].T, codes


def test_released_checkpoint_loads_and_equals_the_equations(tmp_path):
    """The paper's released CRATE checkpoints: nanoGPT-format dicts with their own key names, bias=False recorded."""
    sd, args = released_crate()
    torch.save({'model': sd, 'model_args': args, 'iter_num': 1, 'best_val_loss': torch.tensor(3.5)}, tmp_path / 'ckpt.pt')
    loaded = load_model(str(tmp_path)).double()
    assert (loaded.config.attn, loaded.config.ffn, loaded.config.ista_steps, loaded.config.bias) == ('mssa', 'ista', 2, True)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(8))
    logits, _, codes = loaded(idx, idx, return_neurons=True)
    want_logits, want_codes = crate_from_the_equations(sd, idx, 2, 2)
    torch.testing.assert_close(logits, want_logits)
    for got, want in zip(codes, want_codes):
        torch.testing.assert_close(got, want)
    assert float(loaded.val_loss) == 3.5


def ista_by_hand(x, W, t, eta, lam):
    D = W.T                                               # (d, h)
    A = torch.zeros(*x.shape[:-1], W.shape[0], dtype=x.dtype)
    for _ in range(t):
        residual = x - A @ D.T                            # x - D A, row vectors
        A = torch.clamp(A + eta * residual @ D - eta * lam, min=0)
    return A @ D.T, A


@pytest.mark.parametrize('t, eta, lam', [(2, 0.1, 0.1), (1, 0.1, 0.1), (3, 0.05, 0.2)])
def test_ista_matches_the_formula(t, eta, lam):
    torch.manual_seed(0)
    block = ISTA(ModelConfig(n_embd=16, n_head=2, overcomplete=4, ista_steps=t, ista_eta=eta, ista_lambda=lam)).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out, A = block(x)
    ref_out, ref_A = ista_by_hand(x, block.weight.detach(), t, eta, lam)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A, ref_A, rtol=1e-12, atol=1e-12)
    assert A.min() >= 0 and (A == 0).any() and (A > 0).any()
    assert block.weight.shape == (64, 16)  # D^T, (h, d)
    bound = math.sqrt(6 / 16)                # the authors: kaiming_uniform_(weight), a=0, fan_in = d
    assert block.weight.abs().max() <= bound and block.weight.abs().max() > 0.9 * bound


def test_ista_with_no_sparsity_and_one_step_is_a_relu_layer():
    torch.manual_seed(1)
    block = ISTA(ModelConfig(n_embd=8, n_head=2, ista_steps=1, ista_lambda=0.0)).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    D = block.weight.detach().T
    out, _ = block(x)
    torch.testing.assert_close(out, 0.1 * torch.relu(x @ D) @ D.T, rtol=1e-14, atol=1e-15)


def test_mssa_uses_one_projection_and_is_causal():
    torch.manual_seed(2)
    cfg = ModelConfig(n_embd=16, n_head=4, block_size=12)
    attn = MSSA(cfg).double()
    assert sorted(n for n, _ in attn.named_parameters()) == ['U.weight', 'c_proj.bias', 'c_proj.weight']
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    # by hand: each head attends with q = k = v = U_k x, scale 1/sqrt(p), causal
    u = (x @ attn.U.weight.T).view(2, 12, 4, 4).transpose(1, 2)
    scores = u @ u.transpose(-1, -2) / math.sqrt(4)
    scores = scores.masked_fill(torch.triu(torch.ones(12, 12, dtype=torch.bool), 1), float('-inf'))
    heads = (F.softmax(scores, -1) @ u).transpose(1, 2).reshape(2, 12, 16)
    torch.testing.assert_close(attn(x), attn.c_proj(heads))
    y = attn(x)
    x2 = x.clone()
    x2[:, 7] += 1.0
    y2 = attn(x2)
    assert torch.equal(y[:, :7], y2[:, :7])         # earlier outputs untouched
    assert not torch.allclose(y[:, 7:], y2[:, 7:])  # later ones see the change


def test_crate_block_has_no_residual_around_ista():
    torch.manual_seed(3)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)).double()
    block = model.blocks[0]
    z = torch.randn(1, 8, 16, dtype=torch.float64)
    z_half = z + block.attn(block.ln_1(z))
    out, A = block(z)
    torch.testing.assert_close(out, A @ block.ffn.weight)                # Z_next = D A_t, nothing added
    torch.testing.assert_close(block.ffn(block.ln_2(z_half))[0], out)


@pytest.mark.parametrize('size, crate, gpt2', [
    ((1, 4, 128), 6_538_112, 6_635_904),
    ((2, 4, 128), 6_637_056, 6_832_768),
    ((3, 4, 128), 6_736_000, 7_029_632),
    ((6, 12, 768), 59_891_712, 81_110_784),
    ((12, 12, 768), 81_148_416, 123_587_328),
])
def test_parameter_counts_match_the_papers_table(size, crate, gpt2):
    L, K, d = size
    with torch.device('meta'):  # no memory, no init time: only the shapes count
        assert Transformer(ModelConfig(n_layer=L, n_head=K, n_embd=d)).get_num_params() == crate
        assert Transformer(ModelConfig(n_layer=L, n_head=K, n_embd=d, **GPT2)).get_num_params() == gpt2


def test_init():
    torch.manual_seed(4)
    cfg = ModelConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=4096)
    model = Transformer(cfg)
    b = model.blocks[0]
    assert abs(model.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(b.attn.U.weight.std().item() - 0.02) < 1e-3
    assert abs(b.attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 3e-4
    assert b.attn.c_proj.bias.abs().max() == 0
    bound = math.sqrt(6 / 256)               # the authors' kaiming_uniform_(weight), a=0: +-sqrt(6/d), untouched
    assert 0.99 * bound < b.ffn.weight.abs().max().item() <= bound
    assert abs(b.ffn.weight.std().item() - bound / math.sqrt(3)) < 2e-3
    assert model.lm_head.weight is model.wte.weight
    g = Transformer(ModelConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=4096, **GPT2)).blocks[0]
    assert abs(g.ffn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 3e-4
    assert abs(g.ffn.c_fc.weight.std().item() - 0.02) < 1e-3


@pytest.mark.parametrize('args', [dict(), dict(ista_steps=1), dict(ista_steps=3, overcomplete=2), GPT2,
                                  dict(attn='mha'), dict(ffn='mlp')])
def test_flop_count_matches_flop_counter(args):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128, **args)
    model = Transformer(cfg)
    idx = torch.randint(0, 128, (3, 16))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # the math path is counted
        _, loss = model(idx, idx)
        loss.backward()
    assert counter.get_total_flops() == model.flops_per_token(16) * 3 * 16


def test_ista_costs_twice_an_mlp_and_mssa_half_the_projections():
    d, h = 768, 3072
    crate = Transformer.flops_per_token  # unbound: only the config is read
    flops = lambda **kw: crate(type('M', (), {'config': ModelConfig(n_layer=1, n_head=12, vocab_size=1, **kw)})(), T=1)
    ista, mlp = flops(), flops(ffn='mlp')
    assert ista - mlp == 3 * 4 * d * h                       # 8dh vs 4dh forward
    assert flops(attn='mha') - flops() == 3 * 4 * d * d      # 8d^2 vs 4d^2 forward


def test_neurons_and_steering():
    torch.manual_seed(5)
    for args in (dict(), GPT2):
        model = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64, **args)).eval()
        idx = torch.randint(0, 64, (2, 8))
        logits, _, neurons = model(idx, return_neurons=True)
        assert [a.shape for a in neurons] == [(2, 8, 64)] * 2
        assert all(a.min() >= 0 for a in neurons)
        steered, _, sn = model(idx, steer={1: overwrite([(3, 100.0)])}, return_neurons=True)
        assert torch.equal(sn[0], neurons[0])                 # layer 0 untouched
        assert (sn[1][..., 3] == 100).all()
        assert torch.equal(sn[1][..., 4:], neurons[1][..., 4:])
        assert not torch.allclose(steered, logits)
        same, _ = model(idx, steer={})
        assert torch.equal(same, logits)                      # the steering path itself changes nothing


def test_generate_is_reproducible():
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)).eval()
    x = torch.zeros(1, 3, dtype=torch.long)
    outs = []
    for _ in range(2):
        torch.manual_seed(6)
        outs.append(model.generate(x, 12, temperature=1.0, top_k=5))
    assert torch.equal(*outs) and outs[0].shape == (1, 15)      # longer than block_size: context is cropped
    greedy = model.generate(x, 4, temperature=0)
    assert torch.equal(greedy, model.generate(x, 4, temperature=0))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="attn must be"):
        ModelConfig(attn='linear')
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)


def test_ista_recomputation_gives_the_same_gradients_with_less_memory():
    from torch.autograd.graph import saved_tensors_hooks
    grads, saved = [], []
    for ckpt in (False, True):
        torch.manual_seed(8)
        model = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, ista_checkpoint=ckpt))
        idx = torch.randint(0, 64, (4, 16))
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        saved.append(sum(sizes.values()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert saved[1] < saved[0] - 2 * 4 * 16 * 128 * 4     # at least two h-sized tensors per layer fewer
