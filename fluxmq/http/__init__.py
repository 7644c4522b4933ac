"""fluxmq.http"""
