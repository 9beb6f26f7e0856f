"""Operations on an archive: reindex, export, backup/restore, doctor, evaluation, the sample set, the demo."""
