"""lorakube_dev: the development tools — the one-command demo, the sandbox the e2e tests and the
demo share, and the tiny offline models of each family. They import the operator, the trainer and
localcluster, run from a source checkout, and are never shipped in an image."""
