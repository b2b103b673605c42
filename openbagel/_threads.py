"""How PyTorch's OpenMP threads wait: imported first by ``openbagel/__init__.py``.

PyTorch's OpenMP threads busy-wait after each parallel region by default; on a
machine where other work (or another engine slot) competes for the cores, the
spinning threads take the cores the work needs: ``openbagel bench`` ran 5-30x
slower under load (issue 17). They wait passively unless the user chose a
policy. OpenMP reads the variable once, when torch loads it, so this runs
before anything imports torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
