"""What every worker does for the fleet besides running tasks: the bootstep in the worker's
parent (``step``), the reconciler that re-publishes lost batches (``reconciler``), what it asks
the Redis broker (``broker``), and the fleet's health as ``embedq health`` reports it
(``health``)."""
