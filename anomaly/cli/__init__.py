"""The command-line entry points (anomaly-train, -predict, -export, -update, -report, -distill-teacher,
-check-data): each turns its config into plain values, calls the library and prints what it did."""
