"""The reconciler: compares billing and the ERP, keeps the exception queue, runs corrective syncs (issue 5)."""
