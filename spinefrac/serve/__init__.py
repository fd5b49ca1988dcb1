"""`spinefrac serve`: a DICOM node (pynetdicom) that receives studies, predicts them and sends SR/SC results back.

Modules: spool.py (the durable spool folder), scp.py (C-STORE/C-ECHO SCP), scu.py (C-STORE SCU to the
destination), predict.py (the model loaded once), node.py (the worker thread and `serve`). Needs the
`dicom` extra (pynetdicom, highdicom): pip install 'spinefrac[dicom]'.
"""

from spinefrac.serve.node import ServeNode, serve

__all__ = ["ServeNode", "serve"]
