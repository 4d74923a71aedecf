"""Derived state (CUDA graphs that read raw pointers, packed or re-laid-out weights) forgotten
whenever a module's weights may have changed storage."""


class ForgetsDerivedStateOnNewWeights:
    """Mixin for a module that keeps state derived from its parameters' storage (CUDA graphs read
    raw pointers; packed or re-laid-out weights): `_forget_derived_state()` (the module's own) runs
    whenever the parameters may get new storage or be new objects, i.e. after `.to()`, `.half()`,
    `.cuda()` (nn.Module's `_apply`) and after `load_state_dict` (assign=True puts new objects in
    place). Call `_watch_weights()` once in __init__."""

    def _watch_weights(self):
        self.register_load_state_dict_post_hook(_forget_after_load)

    def _apply(self, fn, *args, **kwargs):
        self._forget_derived_state()
        return super()._apply(fn, *args, **kwargs)

    def _forget_derived_state(self):
        """Drop what was derived (it may run before the subclass's __init__ has set it up)."""
        raise NotImplementedError


def _forget_after_load(module, incompatible_keys):
    """load_state_dict's post hook (a module-level function: modules stay picklable)."""
    module._forget_derived_state()
