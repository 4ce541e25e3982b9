"""The attack engine: FGSM/FGM, PGD (Linf and L2), the random-noise control, the gate attack and
the torchattacks adapter behind one registry (:mod:`~robustse.attacks.engine`). May import
:mod:`robustse.probes` (the gate attack records gates), :mod:`robustse.models`,
:mod:`robustse.data` and :mod:`robustse.core`."""
