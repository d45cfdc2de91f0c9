"""A discrete-event simulator of an RL job on a GPU cluster (`rollfleet simulate`).

    rollfleet simulate examples/clusters/cluster-3000.yaml --out simulate-out

config.py reads CLUSTER.yaml (device classes from spec sheets, network, model, workload,
an RLJob spec); costs.py turns them into seconds; workload.py draws the episodes; sim.py is
the event loop with the runtime's policies; report.py runs a file's variants, sweeps and
claims and prints the table, the plots and the final line.
"""
