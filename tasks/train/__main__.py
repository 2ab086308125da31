"""``python -m distilflow.tasks.train``: the training entry that torchrun starts (see launch.main)."""

import sys

from distilflow.tasks.train.launch import main

sys.exit(main())
