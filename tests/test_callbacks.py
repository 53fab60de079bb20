import keras


def test_drop_warmup_switches_on_at_its_epoch_and_restarts_best_value_tracking():
    from street2shop.callbacks import DropWarmup
    from street2shop.losses import drop_switch

    checkpoint = keras.callbacks.ModelCheckpoint("unused.keras", monitor="loss", save_best_only=True)
    stopping = keras.callbacks.EarlyStopping(monitor="loss", patience=3)
    switch = drop_switch()
    warmup = DropWarmup(switch, 2, restart=[checkpoint, stopping])
    seen = []
    for epoch in range(4):
        checkpoint.best, stopping.best, stopping.wait = 0.5, 0.5, 1  # as if an earlier epoch had been best
        warmup.on_epoch_begin(epoch)
        seen.append((float(switch.numpy()), checkpoint.best, stopping.best, stopping.wait))
    assert seen == [
        (0.0, 0.5, 0.5, 1),
        (0.0, 0.5, 0.5, 1),
        (1.0, None, None, 0),  # the first robust epoch: plain-loss bests no longer compare
        (1.0, 0.5, 0.5, 1),
    ]
    resumed = drop_switch()
    DropWarmup(resumed, 2).on_epoch_begin(3)  # a run resumed after the warm-up
    assert float(resumed.numpy()) == 1.0
