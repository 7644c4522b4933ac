"""fluxmq.storage"""
