"""What every package of streamrec shares, and nothing else: serving imports it without training/.

- ``streamrec.errors``: ``UserError``, the one exception for problems a user can fix.
- ``streamrec.process``: ``configure_process``, the process-wide settings (threads, allocator) made once at process start.
"""
