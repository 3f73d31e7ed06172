"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
plus a process node, on one machine, built from upstream Go modules. See localcluster/README.md."""
