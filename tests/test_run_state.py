from dfkd.engine.run_state import RunState


def test_counters_round_trip_through_a_checkpoint_dict():
    state = RunState()
    for loss in (1.0, 3.0):
        state.record_loss(loss)
    state.synthesis_seconds, state.train_seconds = 1.5, 2.0
    state.plan = {"batch_size": 64}
    restored = RunState()
    restored.update(state.to_dict())
    assert restored == state
    assert restored.elapsed() == 3.5
    assert restored.take_mean_loss() == 2.0
    assert (restored.loss_sum, restored.loss_n, restored.step) == (0.0, 0, 2)


def test_older_checkpoints_restore_what_they_have():
    state = RunState()
    state.update({"step": 7, "a_counter_no_longer_kept": 3})  # and no plan, costs, ...
    assert state.step == 7 and state.plan == {} and not hasattr(state, "a_counter_no_longer_kept")
