-- Whether each restore point is application- or crash-consistent, and why (JSON of
-- drover_types::PointConsistency). NULL for points published before it was recorded.
ALTER TABLE restore_points ADD COLUMN consistency TEXT;
