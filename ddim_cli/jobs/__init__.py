"""The jobs the commands run on a trained checkpoint, one module per command, above the algorithm
modules they use: :mod:`~ddim_cli.jobs.sample` (``ddim sample``), :mod:`~ddim_cli.jobs.invert`,
:mod:`~ddim_cli.jobs.edit` and :mod:`~ddim_cli.jobs.restore`. Each returns tensors and also writes
the files its command writes, so a Python user gets the same outputs without the CLI.

The other commands' library modules are single modules: ``train`` (:mod:`ddim_cli.train`),
``compare`` (:mod:`ddim_cli.compare`), ``fid`` (:mod:`ddim_cli.fid`), ``convert``
(:mod:`ddim_cli.convert`) and ``export`` (:mod:`ddim_cli.export`). All of them start from
:func:`ddim_cli.models.load_model`.
"""
