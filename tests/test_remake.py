"""Re-made blocks (reactive play): a stream whose latest block is made again with actions spliced
from one of its frames on is, bitwise, the stream that was fed the spliced actions from the start
(frames, the DiT's caches, the decoder's history, the blocks after); a re-make with unchanged
actions gives the same frames again. Tiny preset, float32, CPU: reference and optimized models."""
import pytest
import torch

from helpers import build_model
from wan.modules.causal_model import CausalWanModel
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.random_init import randomize_decoder_weights_, random_inputs
from wan.modules.vae_decoder import VAEDecoder3d, VAEDecoderWrapper
from wan.serving.runner import StreamingBlockRunner
from wan.serving.scheduler import PlayerSession

LATENT = (8, 16)


def _decoder(cls):
    decoder = cls()
    decoder.decoder = VAEDecoder3d(dim=16)  # the play server's tiny decoder: quick on a CPU
    torch.manual_seed(3)
    randomize_decoder_weights_(decoder)
    return decoder.float().eval()


@pytest.fixture(scope="module", params=[CausalWanModel, OptimizedCausalWanModel],
                ids=["reference", "optimized"])
def parts(request):
    model = build_model(dtype=torch.float32, cls=request.param)
    decoder_cls = VAEDecoderWrapper if request.param is CausalWanModel else \
        OptimizedVAEDecoderWrapper
    inputs = random_inputs(model, LATENT, 3, 0, seed=1)
    return model, _decoder(decoder_cls), inputs


def _session(parts, seed=5):
    model, decoder, inputs = parts
    runner = StreamingBlockRunner(model, decoder, latent_hw=LATENT)
    runner.keep_for_remake = True
    return PlayerSession("p", runner, inputs["visual_context"], inputs["cond_concat"], seed=seed,
                         mouse_dim=2, keyboard_dim=4)


def _actions(keys, steps):
    """(mouse, keyboard) histories of `steps` steps: keyboard one-hot of `keys`, a camera turn."""
    keyboard = torch.zeros(1, steps, 4)
    keyboard[:, :, list(keys)] = 1.0
    mouse = torch.tensor([0.0, 0.05 * len(keys)]).expand(1, steps, 2).clone()
    return mouse, keyboard


def _state(session):
    """Copies of everything the stream carries on: the DiT's caches and the decoder history."""
    runner = session.runner
    caches = [t.clone() for name in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard",
                                     "crossattn_cache")
              for layer in runner.caches[name] for t in layer.values() if torch.is_tensor(t)]
    history = [t.clone() for t in runner.decoder_cache if t is not None]
    return caches, history


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("block,splice", [(0, 4), (2, 7), (2, 0)])
@torch.no_grad()
def test_a_remade_block_is_the_stream_fed_the_spliced_actions(parts, block, splice):
    old, new = (0,), (1, 3)
    # stream A: blocks 0..block with the old actions, the latest re-made from `splice` on
    a = _session(parts)
    end = a.block_steps(block)[1]
    a.receive(*_actions(old, end))
    for _ in range(block + 1):
        shown, _ = a.run_block()
    first = a.block_steps(block)[0]
    remade, _ = a.remake_block(splice, *_actions(new, end - first - splice))
    remade_state = _state(a)
    following_end = a.block_steps(block + 1)[1]
    a.receive(*_actions(new, following_end - end))
    following, _ = a.run_block()

    # stream B: a fresh stream fed the spliced actions from the start
    b = _session(parts)
    mouse_old, keyboard_old = _actions(old, first + splice)
    mouse_new, keyboard_new = _actions(new, following_end - first - splice)
    b.receive(torch.cat([mouse_old, mouse_new], 1), torch.cat([keyboard_old, keyboard_new], 1))
    for _ in range(block + 1):
        expected, _ = b.run_block()
    expected_state = _state(b)
    expected_following, _ = b.run_block()

    assert torch.equal(remade, expected)
    assert _equal(remade_state[0], expected_state[0]), "the DiT's caches after the re-make"
    assert _equal(remade_state[1], expected_state[1]), "the decoder history after the re-make"
    assert torch.equal(following, expected_following)
    # the splice moved the frames from the splice on (the test would prove nothing otherwise)
    assert not torch.equal(remade[:, splice:], shown[:, splice:])


@torch.no_grad()
def test_a_remake_with_the_same_actions_gives_the_same_frames(parts):
    s = _session(parts)
    s.receive(*_actions((2,), s.block_steps(1)[1]))
    s.run_block()
    shown, _ = s.run_block()
    state = _state(s)
    first, end = s.block_steps(1)
    again, _ = s.remake_block(5, *_actions((2,), end - first - 5))
    assert torch.equal(again, shown)
    assert all(_equal(x, y) for x, y in zip(_state(s), state))


@torch.no_grad()
def test_only_the_latest_block_can_be_remade(parts):
    s = _session(parts)
    with pytest.raises(RuntimeError, match="no block to re-make"):
        s.remake_block(0)
    s.receive(*_actions((0,), s.block_steps(0)[1]))
    s.run_block()
    with pytest.raises(ValueError, match="splice frame 9 outside block 0's 9 frames"):
        s.remake_block(9)
    with pytest.raises(ValueError, match="keyboard: 3 steps given, the block has 5 from frame 4"):
        s.remake_block(4, None, torch.zeros(1, 3, 4))
    s.runner.keep_for_remake = False
    s.run_block()
    with pytest.raises(RuntimeError, match="keep_for_remake on"):
        s.remake_block(0)
