"""Running a study: the sweep (model × attack × eps cells into the results store), its set-up from
checkpoints, the sanity checks, the ``drift`` measurement and the experiment pipeline (spec →
trained models → sweep → report). May import every layer below it: training, attacks, analysis,
probes, data, models and core."""
