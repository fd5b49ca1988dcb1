"""How a run works: configs loaded and checked, resume markers, locks, manifests, atomic artefacts and their sidecars, table schemas, worker pools, the registry of names."""
