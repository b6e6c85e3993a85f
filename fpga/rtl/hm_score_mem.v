// hm_score_mem: the scores of SLOTS queries x NMAX rows, in W single-score RAMs ("lanes") read
// together, so a selection scan reads W scores of one slot per cycle. All slots share the
// lanes: row i of slot s sits in lane (i + s * W / 2^ceil(log2 SLOTS)) mod W at address
// s * NMAX / W + i / W. A stream row (one score per slot, the same row index) then writes
// SLOTS different lanes, each RAM takes one write per cycle, and every RAM is NMAX * SLOTS / W
// deep (8192 at the defaults: two URAM288 each, none wasted by shallow, wide words).
//
// Stream side, a two-stage read-modify-write: cycle 0 reads the stored scores of the row,
// cycle 1 writes op(stored, new) (0 write, 1 add, 2 max) and presents it on up_* for the
// histograms. The RAMs are write-through, so back-to-back updates of one word see each other.
// Read side: `rword` is word `raddr` of slot `rslot`, one cycle after them, scores in row
// order. Reads and stream writes share the RAMs' read port; the stream (in_valid) has it.
`default_nettype none

module hm_score_mem #(
    parameter SLOTS = 1,
    parameter NMAX  = 1024,  // rows per slot; a power of two, at least 2 * W
    parameter W     = 64,    // lanes (scores per read word), a power of two >= 2^ceil(log2 SLOTS)
    parameter XW    = 10     // $clog2(NMAX)
) (
    input wire clk,

    input wire                  in_valid,
    input wire [        XW-1:0] in_idx,
    input wire [     SLOTS-1:0] in_mask,
    input wire [  SLOTS*64-1:0] in_scores,
    input wire [           1:0] in_op,
    input wire                  in_final,

    output reg                 up_valid,  // a row stored this cycle (stage 1)
    output reg [SLOTS-1:0]     up_mask,
    output reg [SLOTS*64-1:0]  up_vals,
    output reg                 up_final,

    input  wire [((SLOTS > 1) ? $clog2(SLOTS) : 1)-1:0] rslot,
    input  wire [                       XW-$clog2(W)-1:0] raddr,
    output reg  [                               W*64-1:0] rword
);
    localparam LW = $clog2(W);
    localparam WA = XW - LW;
    localparam SB = $clog2(SLOTS);  // 0 for one slot
    localparam SW = (SLOTS > 1) ? SB : 1;
    localparam ST = W >> SB;  // lane stride between slots
    localparam NW = NMAX / W;  // words per slot
    localparam AW = WA + SB;
    localparam DEPTH = NW << SB;

    // stage 1 registers
    reg            v1;
    reg [  XW-1:0] idx1;
    reg [SLOTS-1:0] mask1;
    reg [SLOTS*64-1:0] sc1;
    reg [       1:0] op1;
    reg             fin1;
    reg [    SW-1:0] rs1;
    always @(posedge clk) begin
        v1    <= in_valid;
        idx1  <= in_idx;
        mask1 <= in_mask;
        sc1   <= in_scores;
        op1   <= in_op;
        fin1  <= in_final;
        rs1   <= rslot;
    end

    wire [W*64-1:0] dout;

    // stage 1: each slot's stored score (from its lane) merged with the new one
    integer s, p;
    reg [LW-1:0] ln;
    reg [63:0] old, nw;
    always @(*) begin
        for (s = 0; s < SLOTS; s = s + 1) begin
            ln = idx1[LW-1:0] + s * ST;
            // a W-way select written out: yosys lowers dout[64*ln+:64] to a shifter of all
            // W*64 bits per slot (about 30k LUTs each at the defaults)
            old = 64'd0;
            for (p = 0; p < W; p = p + 1) if (ln == p) old = dout[64*p+:64];
            nw = sc1[64*s+:64];
            case (op1)
                2'd1: up_vals[64*s+:64] = old + nw;
                2'd2: up_vals[64*s+:64] = ($signed(nw) > $signed(old)) ? nw : old;
                default: up_vals[64*s+:64] = nw;
            endcase
        end
        up_valid = v1;
        up_mask  = mask1;
        up_final = fin1;
    end

    // read side: undo the slot's rotation
    always @(*) begin
        rword = {(W * 64) {1'b0}};
        for (s = 0; s < SLOTS; s = s + 1)
            if (rs1 == s)
                for (p = 0; p < W; p = p + 1) rword[64*p+:64] = dout[64*((p+s*ST)%W)+:64];
    end

    genvar L;
    generate
        for (L = 0; L < W; L = L + 1) begin : g_lane
            // the slot whose row lands in this lane, at the read (0) and write (1) stage
            wire [LW-1:0] d0 = L - in_idx[LW-1:0];
            wire [LW-1:0] d1 = L - idx1[LW-1:0];
            wire [LW-1:0] sl0 = d0 / ST;
            wire [LW-1:0] sl1 = d1 / ST;
            wire [AW-1:0] ra = in_valid ? (sl0 * NW + in_idx[XW-1:LW]) : (rslot * NW + raddr);
            wire [AW-1:0] wa = sl1 * NW + idx1[XW-1:LW];
            reg we;
            reg [63:0] wd;
            integer t;
            always @(*) begin
                we = 1'b0;
                wd = 64'd0;
                for (t = 0; t < SLOTS; t = t + 1)
                    if (d1 == t * ST) begin
                        we = v1 && mask1[t];
                        wd = up_vals[64*t+:64];
                    end
            end
            hm_ram #(
                .DEPTH(DEPTH),
                .WIDTH(64),
                .AW(AW),
                .ULTRA(1)
            ) u_ram (
                .clk(clk),
                .we(we),
                .waddr(wa),
                .wdata(wd),
                .raddr(ra),
                .rdata(dout[64*L+:64])
            );
        end
    endgenerate
endmodule

`default_nettype wire
