"""The parts the stages share, apart from any one stage: the settings (``config``), the
SQL store (``db``), the bookkeeping trail and the typed record of left-out outputs
(``events``, ``degrade``), a stage process's run loop and the supervisor (``stage``,
``service``), paths under ``storage.root``, the spool and UID checks (``storage``,
``spool``, ``uids``), DICOM TLS and the disk watermark (``tls``, ``diskspace``), the one
table of model families and the weights registry (``families``, ``registry``), and the
image-domain measures ``training/`` labels with (``physics``)."""
