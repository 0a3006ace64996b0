"""QLoRA training: one readable loop, launched as a supervised subprocess.

``run_train`` is the stage: it prepares ``runs/<run_id>/`` (resolved config, inputs), launches the
worker (plain python for one process; ``accelerate launch`` or ``torchrun`` for several, on one or
many nodes), streams its output into the log, and returns the run's manifest. The run directory is
the whole contract between the two, so a killed or preempted worker is resumed by launching it again.

``train_worker`` (worker.py) is the loop, a recipe of ``setup() -> loop() -> finish()`` over one
``State``, with ``train_step()`` the one optimizer step: NF4 base + LoRA (PEFT), PagedAdamW8bit,
warmup + cosine, gradient accumulation, gradient checkpointing, periodic eval on a fixed held-out
sample sharded across ranks, early stopping on it (early_stop.py), atomic checkpoints with the data
position (O(1) resume; checkpoint.py), a divergence guard (guard.py: non-finite or spiking steps are
skipped on every rank; too many roll back to the last good checkpoint or stop), metrics to
metrics.jsonl / TensorBoard / wandb (tracker.py).

Worker exit statuses (what the supervisor does with them):
  0   done; the adapter and manifest.json are written
  75  EXIT_PREEMPTED: SIGTERM/SIGINT (or the supervisor vanished); saved at a step boundary. Launch
      again to resume (the Prefect task retries it)
  76  EXIT_ROLLBACK: diverged; ``rollback.json`` names the checkpoint to reload. run_train relaunches
      at once: the resume path reloads it, with the data position moved past the bad batches
  77  EXIT_DIVERGED: diverged and told to stop (or out of rollbacks); ``diverged.json`` says why

Test/debug hooks (fault injection through environment variables): tasks/train/faults.py.
"""

# The stage's public face; nothing here imports torch (the flow process and CPU workers load it).
from tasks.train.plan import plan_steps
from tasks.train.stage import prepare_run, run_dir_for, run_train, train, train_stage

__all__ = ["plan_steps", "prepare_run", "run_dir_for", "run_train", "train", "train_stage"]
