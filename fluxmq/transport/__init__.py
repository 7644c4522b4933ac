"""fluxmq.transport"""
