// hm_fifo: synchronous first-word-fall-through FIFO, the elastic buffer between an AXI channel
// and the datapath. One push and one pop per cycle without bubbles; `count` lets a master issue
// reads only for data it has room for (credits).
`default_nettype none

module hm_fifo #(
    parameter WIDTH = 512,
    parameter DEPTH = 64  // a power of two
) (
    input  wire                   clk,
    input  wire                   rst,
    input  wire                   clear,
    input  wire                   in_valid,
    input  wire [      WIDTH-1:0] in_data,
    output wire                   in_ready,
    output wire                   out_valid,
    output wire [      WIDTH-1:0] out_data,
    input  wire                   out_ready,
    output reg  [$clog2(DEPTH):0] count
);
    localparam AW = $clog2(DEPTH);

    reg [WIDTH-1:0] mem[0:DEPTH-1];
    reg [AW-1:0] rd_ptr;
    reg [AW-1:0] wr_ptr;

    wire push = in_valid && in_ready;
    wire pop = out_valid && out_ready;

    assign in_ready = count != DEPTH[AW:0];
    assign out_valid = count != 0;
    assign out_data = mem[rd_ptr];

    always @(posedge clk) begin
        if (push) mem[wr_ptr] <= in_data;
        if (rst || clear) begin
            rd_ptr <= 0;
            wr_ptr <= 0;
            count  <= 0;
        end else begin
            if (push) wr_ptr <= wr_ptr + 1'b1;
            if (pop) rd_ptr <= rd_ptr + 1'b1;
            if (push && !pop) count <= count + 1'b1;
            else if (pop && !push) count <= count - 1'b1;
        end
    end
endmodule

`default_nettype wire
