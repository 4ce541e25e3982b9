"""Training and prediction: the train loop (:mod:`~robustse.training.train`), several seeds
trained as one stacked network (:mod:`~robustse.training.seeds`) and predictions, clean accuracy
and temperature fits (:mod:`~robustse.training.predict`). May import :mod:`robustse.probes`
(gate means for a checkpoint), :mod:`robustse.data`, :mod:`robustse.models` and :mod:`robustse.core`."""
