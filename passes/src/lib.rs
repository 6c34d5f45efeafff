//! kiln-passes: the optimiser (pass manager, classic passes, e-graph). Not built yet: see README.
