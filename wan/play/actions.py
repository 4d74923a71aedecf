"""What a player's keys and mouse mean to the model, per game mode (upstream's three action spaces).

Upstream's conditions (`utils/conditions.py` of Matrix-Game-2) give every action step a keyboard
vector and, for the modes with a camera, a mouse vector [pitch, yaw]:

* universal: keyboard [forward, back, left, right] (W S A D, any combination), camera from I/K
  (pitch +-0.1) and J/L (yaw -+0.1), or the mouse;
* gta_drive: keyboard [forward, back] (W S), steering as the camera's yaw (A/D = -+0.1, or the
  mouse's horizontal motion);
* templerun: keyboard one-hot over [no move, jump, slide, turn left, turn right, left side, right
  side] (Q W S Z C A D), no camera; nothing held is "no move".

`InputState` is one player's input as it arrives (held keys, summed mouse motion, single key
taps from the seed server's client); `sample()` turns it into the action of the next block, read
when that block starts. Mouse motion is scaled so that `MOUSE_PIXELS_FOR_FULL_TURN` pixels within
one block give upstream's full camera value (0.1), and clamped to it: the model was trained on
camera values in that range.
"""
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch

CAMERA_VALUE = 0.1          # upstream's CAM_VALUE: the camera step of one key
MOUSE_PIXELS_FOR_FULL_TURN = 240.0  # mouse pixels in one block that give CAMERA_VALUE
# reactive play re-makes a block for a camera change of at least this much (a quarter turn step)
REMAKE_CAMERA_STEP = CAMERA_VALUE / 4


@dataclass(frozen=True)
class ActionSpace:
    """A mode's controls: keyboard slot per key, camera [pitch, yaw] per key, and the slot that
    means "nothing pressed" (templerun's one-hot 'no move'; None for the multi-hot modes)."""
    mode: str
    keyboard: Dict[str, int]
    keyboard_dim: int
    camera: Optional[Dict[str, Tuple[float, float]]]
    idle_slot: Optional[int] = None
    mouse_axes: Tuple[bool, bool] = (True, True)  # which camera axes the mouse drives (pitch, yaw)
    labels: Optional[Dict[str, str]] = None

    @property
    def has_camera(self) -> bool:
        return self.camera is not None

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(self.keyboard) + tuple(self.camera or ())

    def describe(self) -> dict:
        """What the page needs to draw the controls (JSON)."""
        return {"mode": self.mode, "keys": list(self.keys), "labels": dict(self.labels or {}),
                "camera": self.has_camera, "mouse_axes": list(self.mouse_axes)}


ACTION_SPACES = {
    "universal": ActionSpace(
        "universal", keyboard={"w": 0, "s": 1, "a": 2, "d": 3}, keyboard_dim=4,
        camera={"i": (CAMERA_VALUE, 0.0), "k": (-CAMERA_VALUE, 0.0),
                "j": (0.0, -CAMERA_VALUE), "l": (0.0, CAMERA_VALUE)},
        labels={"w": "forward", "s": "back", "a": "left", "d": "right", "i": "look up",
                "k": "look down", "j": "look left", "l": "look right"}),
    "gta_drive": ActionSpace(
        "gta_drive", keyboard={"w": 0, "s": 1}, keyboard_dim=2,
        camera={"a": (0.0, -CAMERA_VALUE), "d": (0.0, CAMERA_VALUE)}, mouse_axes=(False, True),
        labels={"w": "accelerate", "s": "brake/reverse", "a": "steer left", "d": "steer right"}),
    "templerun": ActionSpace(
        "templerun", keyboard={"q": 0, "w": 1, "s": 2, "z": 3, "c": 4, "a": 5, "d": 6},
        keyboard_dim=7, camera=None, idle_slot=0,
        labels={"q": "no move", "w": "jump", "s": "slide", "z": "turn left", "c": "turn right",
                "a": "left side", "d": "right side"}),
}
MODES = tuple(ACTION_SPACES)


def action_space(mode: str) -> ActionSpace:
    if mode not in ACTION_SPACES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return ACTION_SPACES[mode]


@dataclass
class BlockAction:
    """One block's action: a keyboard vector, a camera vector (None without a camera), and the id
    of the newest input message it reflects (0: none yet) with that message's arrival time."""
    keyboard: torch.Tensor
    mouse: Optional[torch.Tensor]
    input_id: int
    input_received: Optional[float]


class InputState:
    """One player's input, written by the server's event loop and read by the GPU worker when a
    block starts (a lock keeps the two apart).

    Three kinds of message feed it: the held key set (`hold`: the page's own client sends the
    whole set on every change), mouse motion (`move`: summed until the next block reads it) and a
    single key press (`tap`: the seed server's client; the key acts for the next block only)."""

    def __init__(self, space: ActionSpace):
        self.space = space
        self._lock = threading.Lock()
        self._held: frozenset = frozenset()
        self._taps: list = []
        self._motion = [0.0, 0.0]  # summed mouse (dx, dy) in pixels
        self.input_id = 0
        self.input_received: Optional[float] = None
        self.shown: Optional[Tuple[int, int, float]] = None  # the page's (block, frame, when)

    def _unknown(self, keys: Iterable[str]):
        return sorted(k for k in keys if k not in self.space.keys)

    def hold(self, keys: Iterable[str], input_id: int, received: float) -> bool:
        """The held key set is now `keys`; True when a key went down (one not held before)."""
        keys = [str(k).lower() for k in keys]
        unknown = self._unknown(keys)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} for mode {self.space.mode}; keys: "
                             f"{', '.join(self.space.keys)}")
        with self._lock:
            pressed = bool(frozenset(keys) - self._held)
            self._held = frozenset(keys)
            self._mark(input_id, received)
        return pressed

    def tap(self, key: str, input_id: int, received: float):
        key = str(key).lower()
        if self._unknown([key]):
            raise ValueError(f"unknown key {key!r} for mode {self.space.mode}; keys: "
                             f"{', '.join(self.space.keys)}")
        with self._lock:
            self._taps.append(key)
            self._mark(input_id, received)

    def move(self, dx: float, dy: float, input_id: int, received: float):
        with self._lock:
            self._motion[0] += dx
            self._motion[1] += dy
            self._mark(input_id, received)

    def _mark(self, input_id: int, received: float):
        self.input_id = max(self.input_id, int(input_id))
        self.input_received = received

    def on_screen(self, block: int, frame: int, since: float):
        """The page has shown frame `frame` of block `block` since `since` (perf_counter, the
        server's clock): where reactive play can splice."""
        with self._lock:
            self.shown = (block, frame, since)

    def has_pending_taps(self) -> bool:
        with self._lock:
            return bool(self._taps)

    def sample(self) -> BlockAction:
        """The next block's action: held keys, plus the oldest waiting tap (one block per
        tap, as the seed server plays them), plus the mouse motion summed since the last block."""
        return self._action(consume=True)

    def differs_from(self, action: BlockAction) -> bool:
        """Whether the action the input gives now (nothing consumed) differs from `action` (the
        one the latest block read): another key set, a waiting tap, or a camera value moved by
        at least REMAKE_CAMERA_STEP (small mouse motions wait for the next block)."""
        now = self._action(consume=False)
        if not torch.equal(now.keyboard, action.keyboard):
            return True
        if now.mouse is None or action.mouse is None:
            return False
        return bool((now.mouse - action.mouse).abs().max() >= REMAKE_CAMERA_STEP)

    def _action(self, consume: bool) -> BlockAction:
        space = self.space
        with self._lock:
            keys = set(self._held)
            if self._taps:
                keys.add(self._taps.pop(0) if consume else self._taps[0])
            dx, dy = self._motion
            if consume:
                self._motion = [0.0, 0.0]
            input_id, received = self.input_id, self.input_received
        keyboard = torch.zeros(space.keyboard_dim)
        for key in keys:
            if key in space.keyboard:
                keyboard[space.keyboard[key]] = 1.0
        if space.idle_slot is not None:  # one-hot: one action at a time, "no move" when idle
            pressed = [space.keyboard[k] for k in sorted(keys) if k in space.keyboard]
            keyboard.zero_()
            keyboard[max(pressed) if pressed else space.idle_slot] = 1.0
        mouse = None
        if space.has_camera:
            pitch = sum(space.camera[k][0] for k in keys if k in space.camera)
            yaw = sum(space.camera[k][1] for k in keys if k in space.camera)
            scale = CAMERA_VALUE / MOUSE_PIXELS_FOR_FULL_TURN
            if space.mouse_axes[0]:
                pitch += -dy * scale  # the browser's y grows downwards; pitch up is positive
            if space.mouse_axes[1]:
                yaw += dx * scale
            mouse = torch.tensor([pitch, yaw]).clamp(-CAMERA_VALUE, CAMERA_VALUE)
        return BlockAction(keyboard, mouse, input_id, received)


def action_steps(action: BlockAction, steps: int, device, dtype):
    """The block's action as the model's condition rows: (mouse [1, steps, 2] or None, keyboard
    [1, steps, dim]), the same action at every step of the block."""
    keyboard = action.keyboard.to(device, dtype).expand(1, steps, -1)
    mouse = None if action.mouse is None else action.mouse.to(device, dtype).expand(1, steps, -1)
    return mouse, keyboard
