"""``mtssl-export-hubert``: the earlier name of ``mtssl-export-score`` (:mod:`fairseq_mtssl.convert.score_export`),
which writes a SCORE student in its upstream's own fairseq format (a HuBERT start gives a HuBERT)."""

from .score_export import ExportError, export_score_student, main

__all__ = ["ExportError", "export_score_student", "main"]

if __name__ == "__main__":
    main()
