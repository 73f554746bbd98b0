"""One run of the product: its configuration (``config``), the stages from DICOM to scored maps
(``pipeline``), the writer of SEG, SR and report.json (``report``) and the comparison of two runs
(``diff``). The only layer that reads the configuration file.
"""
