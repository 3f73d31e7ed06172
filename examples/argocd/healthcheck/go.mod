// Runs an Argo CD health script on one object the way Argo CD does (see main.go): used by the
// tests on the example health check and by anyone checking a job by hand.
module lorakube.local/examples/argocd/healthcheck

go 1.24

require (
	github.com/yuin/gopher-lua v1.1.2
	layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427
)
