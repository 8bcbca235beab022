"""Per-rank telemetry from training frameworks, one line each, through otel_ml's one pipeline.

Each module imports its framework only when it is imported itself (this package imports none),
and says which extra to install when the framework is missing:

* :mod:`.transformers`: ``Trainer(callbacks=[OtelMLCallback()])`` (TRL trainers too);
* :mod:`.lightning`: ``Trainer(callbacks=[OtelMLCallback()])`` or ``Trainer(logger=OtelMLLogger())``;
* :mod:`.accelerate`: ``Accelerator(log_with=[OtelMLTracker()])`` (or ``log_with="otel_ml"``);
* :mod:`.tensorboard`: ``SummaryWriter`` that also exports, and ``patch()`` for every writer;
* :mod:`.verl`: ``OtelMLTracking``, a tracker with verl's ``log(data, step)`` / ``finish()``;
* :mod:`.torchelastic`: a ``torch.distributed.elastic.metrics`` handler for torchrun's agent.

Every rank exports its own series (nothing is gathered); values go through ``otel_ml.log()``,
regions through ``otel_ml.span()`` and progress through ``otel_ml.tqdm``.

Example::

    from otel_ml.integrations.transformers import OtelMLCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[OtelMLCallback()])
"""
