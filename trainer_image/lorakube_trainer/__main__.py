"""`python -m lorakube_trainer` is the same as `lorakube-train`."""

from .cli import main

main()
