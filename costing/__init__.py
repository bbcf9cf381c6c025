"""The cost domain: usage parsing, pricing, budgets and the ledger. Knows nothing of HTTP."""
