"""The training engine shared by pre-training and fine-tuning (docs/architecture.md "The training
engine"): the loop (``loop.train``), its schedule (``schedule.Schedule``), one optimisation step
(``step``), the run's records (``records``), checkpoint state and resume (``run_state``)."""
