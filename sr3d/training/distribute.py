"""tf.distribute: the strategy of a run, which worker writes it, and the training loop of the
replicated strategies (Keras `fit` serves the default one)."""
from __future__ import annotations

import os

from sr3d.training.config import STRATEGIES, TrainConfig
from sr3d.training.network import two_term_loss


def make_strategy(name: str, logical_cpus: int = 2):
    """The tf.distribute strategy for `name`.

    default: one device. mirrored: every local GPU, or, on a machine without
    GPUs, `logical_cpus` logical CPU devices (the CPU is split so that the
    replicated path can be used and tested anywhere). multi_worker: one
    replica per worker process, cluster taken from the TF_CONFIG environment
    variable (see docs/scaling.md).
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(logical_cpus)])
        except RuntimeError as error:  # the runtime is up: fine if it already has the devices
            if len(tf.config.list_logical_devices("CPU")) < logical_cpus:
                raise RuntimeError("the mirrored strategy must be set up before TensorFlow runs any "
                                   "operation in this process") from error
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy multi_worker needs the TF_CONFIG environment variable "
                             "(cluster and task of this worker): see docs/scaling.md")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (resolver.task_type == "worker" and resolver.task_id == 0
                                                    and "chief" not in resolver.cluster_spec().as_dict())



def fit_custom_loop(model, config: TrainConfig, sampler, steps: int, strategy, start: tuple[int, int],
                     callbacks: list) -> None:
    """Training with `strategy.run` for the replicated strategies (mirrored, multi_worker).

    Keras 3 `fit` fails under MultiWorkerMirroredStrategy in TF 2.21 ("unsupported type
    PerReplica"); under MirroredStrategy on two logical CPUs it runs, but its results vary from
    run to run and drift from the single-device run after a few steps. This loop reproduces the
    single-device losses and weights to float round-off with either strategy. Same model, loss,
    data and callbacks as `fit`.

    Every worker draws the same seeded global batch and keeps its own slice of it, so the global
    batch (and what is learned) is the same as on one device.
    """
    import keras
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ValueError(f"batch_size {config.batch_size} must divide by the {replicas} replicas")
    p = config.patch_size
    hy, hx = config.patch_config().hr_patch_shape

    def make_dataset(epoch: int, first: int):
        def dataset_fn(context):
            per_worker = config.batch_size // context.num_input_pipelines
            begin = context.input_pipeline_id * per_worker

            def generate():
                for lr, hr in sampler.batches(epoch, first, steps):
                    yield lr[begin:begin + per_worker], hr[begin:begin + per_worker]

            signature = (tf.TensorSpec((None, p, p, 1), tf.float32), tf.TensorSpec((None, hy, hx, 1), tf.float32))
            ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
            return ds.unbatch().batch(context.get_per_replica_batch_size(config.batch_size)).prefetch(2)

        return strategy.distribute_datasets_from_function(dataset_fn)

    # Optimizer slots are made here, in cross-replica context: creating them lazily inside
    # strategy.run fails with two local replicas.
    if not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)

    def replica_step(lr, hr):
        with tf.GradientTape() as tape:
            outputs = model(lr, training=True)
            per_example = two_term_loss(hr, outputs, config.intermediate_weight)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(iterator):
        lr, hr = next(iterator)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(lr, hr)), axis=None)

    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=config.verbose > 0,
                                                 model=model, verbose=config.verbose, epochs=config.epochs,
                                                 steps=steps)
    callback_list.on_train_begin()
    for epoch in range(start[0], config.epochs):
        first = start[1] if epoch == start[0] else 0
        callback_list.on_epoch_begin(epoch)
        iterator = iter(make_dataset(epoch, first))
        total = 0.0
        logs = {}
        for step in range(first, steps):
            callback_list.on_train_batch_begin(step - first)
            total += float(train_step(iterator))
            logs = {"loss": total / (step - first + 1)}
            callback_list.on_train_batch_end(step - first, logs)
        callback_list.on_epoch_end(epoch, dict(logs))
    callback_list.on_train_end()
