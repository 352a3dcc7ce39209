"""`launch bench comm`: measuring a cluster's collective bandwidths, inside a node and across nodes (job side)."""
